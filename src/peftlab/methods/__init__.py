"""One file per method. Importing this package registers every method file in it.

A new method is a new file here with an `@register("name")` config dataclass; nothing else
needs editing.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
