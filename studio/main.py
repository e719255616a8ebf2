"""The `studio` command."""


def run() -> None:
    pass
