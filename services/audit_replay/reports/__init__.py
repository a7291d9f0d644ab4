"""Report documents (evidence, debriefs, attestations) and their renderers."""
