"""``python -m htc_kernels.info [--short]``: print what this installation can run here.

The report itself is ``htc_kernels.info()`` (implemented in ``htc_kernels/_info.py``). Importing this
module makes Python bind ``htc_kernels.info`` to the module, so the module is made callable too:
``htc_kernels.info()`` returns the report either way.
"""

import sys
import types

from htc_kernels._info import _main, info


class _CallableModule(types.ModuleType):
    def __call__(self) -> dict:
        return info()


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    _main(sys.argv[1:])
