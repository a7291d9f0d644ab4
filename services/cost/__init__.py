"""Price tables per tenant and the cost attributed to every recorded step."""
