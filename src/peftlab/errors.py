"""The one exception type peftlab raises for bad input.

Every message names the problem and the fix. It subclasses ValueError so that callers who
already catch ValueError for bad arguments keep working.
"""


class PeftlabError(ValueError):
    """Bad input: the message says what was wrong and what to do instead."""
