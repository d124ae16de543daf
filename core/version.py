"""Versions: the package's and the plugin contract's."""

__version__ = "0.1.0"

#: The plugin contract's version, "MAJOR.MINOR". A plugin states the version it was built for
#: in a module attribute ``TOKENMILL_CONTRACT``. It is compatible when the majors are equal and
#: the plugin's minor is not newer than ours (hooks only grow within a major).
CONTRACT_VERSION = "1.0"


def contract_compatible(plugin_version: str, core_version: str = CONTRACT_VERSION) -> bool:
    """True when a plugin built for ``plugin_version`` can run on ``core_version``."""
    try:
        p_major, p_minor = (int(x) for x in str(plugin_version).split("."))
        c_major, c_minor = (int(x) for x in core_version.split("."))
    except ValueError:
        return False
    return p_major == c_major and p_minor <= c_minor
