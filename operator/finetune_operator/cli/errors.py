"""The CLI's one error type, apart from the cluster code so that offline commands never import a Kubernetes client."""


class CliError(Exception):
    """A failure the user can act on, printed as one line."""
