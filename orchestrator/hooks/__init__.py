"""The plugin hooks (specs) and the plugin manager that loads entry points."""
