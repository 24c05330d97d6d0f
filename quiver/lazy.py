"""Package exports imported on first use (PEP 562), so that `quiver --help` and the config
dataclasses load without torch: importing a package runs its `__init__`, and an `__init__`
that imported its modules eagerly would load torch, transformers and peft (seconds) for
every command, even help.

    __getattr__, __dir__ = lazy_exports(__name__, {"Library": "quiver.library.store"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: name `n` of `exports` (`{name: module}`)
    is `module.n`, imported when first asked for; any other name is a submodule of the
    package, if there is one."""

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        if not name.startswith("__"):
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise  # the submodule exists but something it imports does not
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
