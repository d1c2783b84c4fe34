"""The machinery shared by the two module function tables.

A table class (AuthFunctions, StorageFunctions) lists every entry as a
method: its name, signature and docstring are the module writer's reference,
its body is the default used when no loaded module defines that name.
The loader fills an instance entry by entry: the first module of the class
that defines a name supplies it, and every other name stays the default.
Defaults are bound methods, so a default calls other entries through `self`
and reaches whichever module supplied them (as the C defaults called the
global symbols).
"""

import inspect


class FunctionTable:
    CLASS = ""  # "auth" or "storage": the module class this table takes

    def __init__(self):
        # entry name -> name of the module that supplied it ("default" if none)
        self.supplied_by = {name: "default" for name in self.entry_names()}

    @classmethod
    def entry_names(cls):
        """The table entries in declaration order."""
        return [
            name for name, value in vars(cls).items() if name.startswith(cls.CLASS + "_") and inspect.isfunction(value)
        ]

    def supply(self, name, function, module_name):
        """Use a module's function for `name` unless an earlier module did."""
        if self.supplied_by[name] != "default":
            return False
        setattr(self, name, function)
        self.supplied_by[name] = module_name
        return True
