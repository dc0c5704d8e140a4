"""The version of vaefast: the one source of ``vaefast.__version__``, ``vaefast --version`` and the package metadata
(``pyproject.toml`` reads it with ``dynamic = ["version"]``; the history is in CHANGELOG.md)."""

__version__ = "0.3.0"


def version_note(written_by: str | None, what: str) -> str | None:
    """A one-line note when ``what`` (e.g. a results database) was written by another version of vaefast.

    Args:
        written_by: the version recorded in it (None: not recorded).
        what: how to name it in the note.

    Returns:
        ``"<what> was written by vaefast A; this is vaefast B"``, or None when A is this version or unknown.
    """
    if written_by is None or written_by == __version__:
        return None
    return f"{what} was written by vaefast {written_by}; this is vaefast {__version__}"
