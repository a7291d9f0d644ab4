"""Process runtime and composition root: the registry of installed services, the URL resolver,
embedded servers, the supervisor and the ``mctl`` command."""
