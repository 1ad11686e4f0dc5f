"""Read-only guard of the device checks (bench/device_advisory_check.sh, bench/device_clock_check.py): put this
directory first on PYTHONPATH and every pynvml setter refuses and says so on stderr ("PALS-GUARD")."""
import sys


def _install():
    try:
        import pynvml
    except Exception:  # no pynvml in this interpreter: nothing to guard
        return
    prefixes = ("nvmlDeviceSet", "nvmlDeviceReset", "nvmlDeviceClear", "nvmlUnitSet", "nvmlSystemSet")

    def blocked_factory(name):
        def blocked(*args, **kwargs):
            sys.stderr.write(f"PALS-GUARD: blocked NVML setter {name}{args[1:]!r}\n")
            sys.stderr.flush()
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)

        return blocked

    for name in dir(pynvml):
        if name.startswith(prefixes) and callable(getattr(pynvml, name)):
            setattr(pynvml, name, blocked_factory(name))


_install()

# Chain to the interpreter's own sitecustomize, if any, which this file shadows.
import importlib.machinery as _m  # noqa: E402
import os as _os  # noqa: E402

_here = _os.path.dirname(_os.path.abspath(__file__))
_spec = _m.PathFinder.find_spec("sitecustomize", [p for p in sys.path if _os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _code = _spec.loader.get_code("sitecustomize")
    if _code is not None:
        exec(_code, {"__name__": "sitecustomize_chained", "__file__": _spec.origin})
