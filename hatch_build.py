"""Ship softsae_plugin_autoload.pth in editable installs too (hatchling leaves force-include out of them)."""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PTH = "softsae_plugin_autoload.pth"


class AutoloadHook(BuildHookInterface):
    """Add the start-up .pth file to the editable wheel (the regular wheel gets it from force-include)."""

    def initialize(self, version: str, build_data: dict) -> None:
        if version == "editable":
            build_data["force_include_editable"][PTH] = PTH
