"""The exception tree of ocibuild.

Every error a user can see is an :class:`OcibuildError`; ``str(err)`` is the one-line message, naming the file,
reference or layer concerned, and ``err.hint`` says what to do next::

    OcibuildError               str() is the message; .hint says what to do next
    ├── UsageError              the command line names what does not exist: exit 2, as argparse's own
    ├── RecipeError             layers/lvm2/layer.toml: unknown key 'ouput' (did you mean 'output'?)
    ├── LockError               ocibuild.lock is missing an entry or out of date
    ├── FetchError              an input (archive url, suite Release file) could not be downloaded
    ├── FormatError             OCI data (digest, reference, manifest, index, config) is malformed
    ├── StoreError              the local OCI layout cannot be read or written
    │   ├── BlobNotFound
    │   ├── DigestMismatch      blob sha256:ab12… is corrupt (content hashes to sha256:cd34…)
    │   └── EntryConflict       cache entry go-3f2a…: the store has sha256:ab12…, refused sha256:cd34…
    ├── UnsafeArchive           layer sha256:…: entry '../etc/passwd' escapes the root
    ├── LayerConflict           independent layers write different content at the same path (--strict)
    ├── RegistryError           .status, .code (OCI error code), .retryable; never contains credentials
    └── EngineError             podman / nerdctl / mmdebstrap could not do what was asked
        └── StepFailed          layer 'lvm2': script exited 2; last 20 lines follow

Library exceptions (OSError, tomllib, zstandard, subprocess) are translated into these at the one call site that
knows what was being done; nothing else reaches the CLI.
"""

from __future__ import annotations


class OcibuildError(Exception):
    """Base of every error ocibuild reports; the CLI prints ``error: <str>`` and ``hint: <hint>``."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    @property
    def message(self) -> str:
        return str(self)


class UsageError(OcibuildError):
    """The command line asks for something that does not exist (an unknown layer name) or cannot go together;
    found only once the project is read, so argparse cannot say it. The CLI exits 2, as for argparse's errors."""


class RecipeError(OcibuildError):
    """ocibuild.toml or a layer.toml is malformed, inconsistent or refers to something missing."""


class LockError(OcibuildError):
    """ocibuild.lock lacks an entry the build needs, or an input moved since it was locked."""


class FetchError(OcibuildError):
    """An input could not be downloaded or did not match its declared digest."""


class FormatError(OcibuildError):
    """OCI data — a digest, reference, descriptor, manifest, index or config — is malformed."""


class StoreError(OcibuildError):
    """The local OCI image layout could not be read or written."""


class BlobNotFound(StoreError):
    """A blob that must exist in the store does not."""


class DigestMismatch(StoreError):
    """Content does not hash to the digest (or size) it was addressed by."""


class EntryConflict(StoreError):
    """A cache entry would re-point a tag that already names another layer content for that key."""


class UnsafeArchive(OcibuildError):
    """A tar stream holds an entry that would write outside its root, a device node, or is malformed."""


class LayerConflict(OcibuildError):
    """Independent layers put different content at the same path (an error only with --strict)."""


class RegistryError(OcibuildError):
    """A registry request failed. Never carries credentials."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        status: int | None = None,
        code: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message, hint)
        self.status = status
        self.code = code
        self.retryable = retryable


class EngineError(OcibuildError):
    """A container engine or helper tool could not be used."""


class StepFailed(EngineError):
    """A build step (a run script, mmdebstrap) exited non-zero."""

    def __init__(self, message: str, hint: str | None = None, *, exit_code: int, tail: str = "") -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code
        self.tail = tail
