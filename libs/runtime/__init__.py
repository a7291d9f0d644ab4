"""Process runtime: embedded servers, the supervisor and the ``mctl`` command."""
