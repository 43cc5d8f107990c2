"""Public-domain sample texts shipped inside the package, for demos, examples and tests.

A plain ``pip install lowbit`` has them: no download, no data folder.

>>> text = sample_text("austen_pp")                     # Pride and Prejudice, 684,428 chars
>>> read_text("sample:austen_pp") == text               # doctest: +SKIP
True

Wherever lowbit takes a text or a text file (:func:`lowbit.data.read_text`,
:func:`lowbit.data.calibration_batches`), the string ``"sample:NAME"`` names a packaged
sample. That spelling always means the sample: a file whose name starts with ``sample:`` is
read by passing a :class:`~pathlib.Path` (or ``"./sample:..."``).

Provenance and licence of each text: ``src/lowbit/data/texts/README.md``.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from lowbit.errors import ConfigError

SAMPLE_PREFIX = "sample:"


@dataclass(frozen=True)
class SampleInfo:
    """What a packaged sample is: ``name`` (what :func:`sample_text` takes), ``title``
    (for reports: which text was scored), ``file`` (under ``lowbit/data/texts/``, gzip),
    ``chars`` (length of the text in characters), ``sha256`` (of its UTF-8 bytes),
    ``source`` and ``licence``."""

    name: str
    title: str
    file: str
    chars: int
    sha256: str
    source: str
    licence: str

    @property
    def spec(self) -> str:
        """The string that names this sample in :func:`lowbit.data.read_text`:
        ``"sample:NAME"``."""
        return SAMPLE_PREFIX + self.name


_SAMPLES = {
    "austen_pp": SampleInfo(
        name="austen_pp",
        title="Jane Austen, Pride and Prejudice",
        file="austen_pp.txt.gz",
        chars=684_428,
        sha256="0770f4bae5c1392b0ce05d4b053df85e0837e30c1ec35c03661bafe2b7be7fee",
        source="Debian r-cran-janeaustenr (from Project Gutenberg), paragraphs unwrapped",
        licence="public domain"),
}


def sample_text_names() -> tuple[str, ...]:
    """The names of the packaged sample texts, sorted (``("austen_pp",)``)."""
    return tuple(sorted(_SAMPLES))


def sample_info(name: str) -> SampleInfo:
    """The :class:`SampleInfo` of sample ``name`` (``"austen_pp"`` or ``"sample:austen_pp"``).

    Raises :class:`~lowbit.errors.ConfigError` naming the known samples for an unknown name.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a sample text name is a str, got {type(name).__name__}")
    key = name.removeprefix(SAMPLE_PREFIX)
    info = _SAMPLES.get(key)
    if info is None:
        raise ConfigError(f"no packaged sample text {key!r}; the samples are: "
                          f"{', '.join(repr(n) for n in sample_text_names())}")
    return info


def sample_text(name: str = "austen_pp") -> str:
    """The text of the packaged sample ``name`` (``"austen_pp"`` or ``"sample:austen_pp"``):
    a ``str`` of :attr:`SampleInfo.chars` characters, read from the package and decompressed
    once per process (later calls return the cached string).

    Raises :class:`~lowbit.errors.ConfigError` for an unknown name, and when the packaged
    file is missing or does not match its recorded SHA-256 (a broken installation).
    """
    return _read(sample_info(name).name)


def is_sample_spec(s: object) -> bool:
    """Whether ``s`` is a ``str`` of the form ``"sample:NAME"`` (known name or not)."""
    return isinstance(s, str) and s.startswith(SAMPLE_PREFIX)


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    info = _SAMPLES[name]
    res = resources.files("lowbit.data").joinpath("texts", info.file)
    try:
        raw = gzip.decompress(res.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ConfigError(f"packaged sample {name!r} ({info.file} in lowbit/data/texts) "
                          f"cannot be read: {e}; reinstall lowbit") from None
    if hashlib.sha256(raw).hexdigest() != info.sha256:
        raise ConfigError(f"packaged sample {name!r} ({info.file}) does not match its "
                          f"recorded SHA-256 {info.sha256[:12]}...; reinstall lowbit")
    return raw.decode("utf-8")
