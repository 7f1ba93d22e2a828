"""The one exception type for bad user input; the CLI turns it into one line and exit status 2."""


class MrpfError(Exception):
    """A problem with the user's input (params, data, checkpoint, device) that code cannot fix."""
