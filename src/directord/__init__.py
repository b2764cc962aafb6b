"""directord: an asynchronous deployment and operations platform.

The public library API is :class:`DirectordConnect`; everything else is
internal and may change between releases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["DirectordConnect", "__version__"]

if TYPE_CHECKING:
    from directord.connect import DirectordConnect


def __getattr__(name: str) -> Any:
    # The library facade is imported lazily so that `import directord` in the
    # node agent or the CLI does not pay for the user-API client it never uses.
    if name == "DirectordConnect":
        from directord.connect import DirectordConnect

        return DirectordConnect
    raise AttributeError(name)
