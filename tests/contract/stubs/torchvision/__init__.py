"""Import-only stand-in for torchvision in the SGLang contract environment.

Why a stub: PyPI's Linux torchvision wheels link against torch's CUDA libraries (`libtorch_cuda.so`) and fail to
import next to the CPU torch (`operator torchvision::nms does not exist`), and no CPU build of a matching version
is on the package index here. SGLang imports torchvision at module level only for multimodal preprocessing
(InternVL, Qwen-VL image transforms), which the contract tests never run; they need the import to succeed.
Every attribute and submodule resolves to an inert placeholder; calling one raises, so a test that reached real
image code would fail instead of passing silently. There is no dist-info, so transformers'
`is_torchvision_available()` stays False.
"""

import importlib.abc
import importlib.machinery
import sys
import types


class _StubType(type):
    def __getattr__(cls, name: str) -> str:
        if name.startswith("__"):
            raise AttributeError(name)
        return f"{cls.__name__}.{name}"  # enum members such as InterpolationMode.BICUBIC, used as dict keys


class _Placeholder(metaclass=_StubType):
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("torchvision is stubbed in the SGLang contract environment (see its __init__.py)")


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        # CamelCase names are classes (InterpolationMode, Compose), others functions: both raise when used.
        value = type(name, (_Placeholder,), {}) if name[:1].isupper() else _Placeholder
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


__version__ = "0.0.0+contract-stub"
__path__: list[str] = []
sys.meta_path.insert(0, _Finder())
sys.modules[__name__].__class__ = _StubModule
