"""Errors of a request to the engine: what the caller asked for cannot be done (a sampling
option out of range, a prompt longer than the model's context, no chat template).  The CLI
prints them as one `amxc: error:` line; a server answers them with a 400."""


class RequestError(ValueError):
    pass


def clip(text, limit: int = 500) -> str:
    """Text from a file or a template, cut short for an error message."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
