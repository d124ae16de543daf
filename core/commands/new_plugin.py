"""``tokenmill new-plugin NAME``: scaffold a hardware plugin package that passes the conformance suite.

The package it writes (``tokenmill-NAME/`` unless ``--dir`` says otherwise) installs with
``pip install -e``, shows up in ``tokenmill plugins`` through its entry point, and passes
``tokenmill conformance NAME`` unchanged: its platform computes on the host and every
op and the attention fall back to the core's reference until its author replaces them.
"""
from __future__ import annotations

import keyword
import re
from pathlib import Path

from tokenmill.version import CONTRACT_VERSION, __version__

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "tokenmill platform plugin for {name}"
requires-python = ">=3.10"
# No torch pin: the platform's own torch build is installed first.
dependencies = ["tokenmill>={core_version}"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The entry point is what makes tokenmill find the plugin: group "tokenmill", name = the platform name.
[project.entry-points.tokenmill]
{name} = "{pkg}.plugin"

[tool.setuptools.packages.find]
include = ["{pkg}*"]
'''

README = '''# {dist}

A tokenmill hardware plugin for the platform `{name}`, scaffolded by
`tokenmill new-plugin {name}`.

```bash
pip install -e .             # from this folder
tokenmill plugins            # lists "{name}" with its platform
tokenmill conformance {name}  # the conformance suite; --report report.md writes Markdown
pytest tests                 # the same suite as a test
```

As scaffolded, the platform computes on the host CPU and every op and the attention fall
back to the core's reference. Make it yours, one step at a time, re-running the suite:

1. `{pkg}/platform.py`: point `torch_device_type`, `device()`, `memory_info()`,
   `synchronize()`, `dist_backend` and `capabilities` at your device, and make
   `availability()` say when it is present.
2. `{pkg}/plugin.py`: register faster kernels (`tokenmill_kernels`) and an attention
   backend (`tokenmill_attention_backends`) for the platform name `"{name}"`.

See docs/writing-a-plugin.md in tokenmill for the contract, hook by hook.
'''

INIT = '''"""{dist}: the tokenmill plugin for the platform ``{name}`` (entry point ``{pkg}.plugin``)."""

__version__ = "0.1.0"
'''

PLATFORM = '''"""The ``{name}`` platform: what tokenmill asks of the device.

As scaffolded it computes on the host CPU, so the package works (and passes the
conformance suite) before it drives any hardware. Replace each method with your device's.
"""
from __future__ import annotations

from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform, host_memory_info


class {cls}(Platform):
    """The ``{name}`` device family."""

    name = "{name}"
    # torch's name for the device ("cuda", "xpu", "xla", a PrivateUse1 name...).
    torch_device_type = "cpu"
    # --device auto picks the available platform with the highest priority. Below the CPU
    # platform's 0 while this runs on the host; raise it once it drives real hardware.
    priority = -10
    dist_backend = "gloo"
    capabilities = Capabilities(dtypes=("float32", "bfloat16"), fp8=False, graphs=False, static_shapes=False,
                                pinned_memory=False)

    def availability(self) -> Availability:
        # Must not raise: return Availability(False, "why") when the device or its library is missing.
        return Availability(True)

    def memory_info(self) -> MemoryInfo:
        return host_memory_info()

    def kv_cache_budget(self, fraction: float) -> int:
        # Host memory is shared with everything else: stay modest.
        return min(int(self.memory_info().free * fraction), 1 << 30)

    def synchronize(self) -> None:
        # Host computation is synchronous; a device waits for its queues here.
        return None

    def describe(self) -> dict:
        return {{"device": "host CPU (scaffold)"}}
'''

PLUGIN = '''"""The hooks of {dist} (entry point ``{name}`` in the group ``tokenmill``).

tokenmill imports this module at start-up: keep it light, import heavy libraries inside
the hooks. Each hook returns a list; what you do not register falls back to the core's
reference (ops, attention) or stays unavailable (platforms).
"""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl

#: The plugin contract this plugin was written for; tokenmill refuses an incompatible one.
TOKENMILL_CONTRACT = "{contract}"


@hookimpl
def tokenmill_platforms():
    from {pkg}.platform import {cls}

    return [{cls}()]


@hookimpl
def tokenmill_kernels():
    """Faster ops for "{name}": ``KernelImpl(op, "{name}", fn, provider="{dist}")`` per op.

    Op names and exact contracts: ``tokenmill.ops.registry``. The conformance suite checks
    each one against the reference op.
    """
    return []


@hookimpl
def tokenmill_attention_backends():
    """``AttentionBackend`` subclasses with ``device_types = ("{name}",)``; none: the reference serves."""
    return []
'''

TEST = '''"""The tokenmill conformance suite against this plugin (installed, so found by its entry point)."""
from tokenmill.conformance import run_suite


def test_conformance():
    report = run_suite("{name}")
    print(report.table())
    assert report.ok, report.table()
'''


def add_arguments(parser) -> None:
    parser.add_argument("name", help="platform and entry-point name: lowercase letters, digits, underscores")
    parser.add_argument("--dir", default=None, help="where to write the package (default: ./tokenmill-NAME)")
    parser.add_argument("--force", action="store_true", help="overwrite files that already exist")


def scaffold(name: str, directory: str | Path | None = None, force: bool = False) -> Path:
    """Write the plugin package for ``name``; returns its directory. ValueError on a bad name or existing files."""
    if not NAME_RE.match(name) or keyword.iskeyword(name):
        raise ValueError(f"plugin name {name!r} must be lowercase letters, digits and underscores, "
                         f"starting with a letter")
    pkg = f"tokenmill_{name}"
    dist = f"tokenmill-{name.replace('_', '-')}"
    cls = "".join(part.capitalize() for part in name.split("_")) + "Platform"
    root = Path(directory) if directory is not None else Path(dist)
    fields = dict(name=name, pkg=pkg, dist=dist, cls=cls, contract=CONTRACT_VERSION,
                  core_version=__version__)
    files = {
        "pyproject.toml": PYPROJECT, "README.md": README, f"{pkg}/__init__.py": INIT,
        f"{pkg}/platform.py": PLATFORM, f"{pkg}/plugin.py": PLUGIN, "tests/test_conformance.py": TEST,
    }
    existing = [rel for rel in files if (root / rel).exists()]
    if existing and not force:
        raise ValueError(f"{root} already has {', '.join(existing)}; pass --force to overwrite")
    for rel, template in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields))
    return root


def run(args) -> int:
    root = scaffold(args.name, args.dir, args.force)
    where = "." if root.resolve() == Path.cwd().resolve() else str(root)
    print(f"wrote the plugin package {root}/ for platform {args.name!r}. Next:")
    print(f"  pip install -e {where}")
    print("  tokenmill plugins")
    print(f"  tokenmill conformance {args.name}")
    return 0
