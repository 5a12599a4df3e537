"""PEP 517 backend: setuptools, building against the torch the user already has.

A C++/CUDA extension must be compiled against the very torch it will be
loaded into. pip's default build isolation hides the target environment's
packages, so a plain `torch` build requirement would download a second torch
(possibly another version or CUDA flavour) just to compile against it. This
backend looks for torch in the target environment first:

- torch importable (``--no-build-isolation``) or installed in the target
  interpreter's site-packages (pip hides those from isolated builds): compile
  against it and do not ask pip for another; the installed torch is left as
  it is.
- no torch anywhere (a fresh machine): ask pip for ``torch>=2.4``; the same
  requirement in ``install_requires`` installs the same release into the
  target environment.
"""
import importlib.util
import os
import site
import sys

from setuptools import build_meta as _setuptools

TORCH_REQUIREMENT = "torch>=2.4"


def _target_site_with_torch():
    """The target environment's site-packages dir holding torch, or None."""
    dirs = list(site.getsitepackages())
    # pip sets PYTHONNOUSERSITE for the build, so whether the user site was on
    # is unknown; outside a virtual environment it usually is.
    if sys.prefix == sys.base_prefix:
        dirs.append(site.getusersitepackages())
    for d in dirs:
        if os.path.isfile(os.path.join(d, "torch", "__init__.py")):
            return d
    return None


def _torch_importable():
    return importlib.util.find_spec("torch") is not None


def _expose_target_torch():
    """Make the target environment's torch importable inside an isolated build.

    The directory goes to the end of sys.path: the build environment's own
    setuptools/wheel/ninja keep precedence, torch and its dependencies come
    from the environment it will run in. PYTHONPATH carries it to the
    compiler subprocesses that import torch (ninja is driven from here).
    """
    if _torch_importable():
        return
    d = _target_site_with_torch()
    if d is None:
        return
    sys.path.append(d)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), d) if p)


def _extra_requires():
    if _torch_importable() or _target_site_with_torch() is not None:
        return []
    return [TORCH_REQUIREMENT]


# setuptools' own get_requires_* would execute setup.py, which needs torch
# before torch can have been asked for; setup.py declares no setup_requires,
# so its answer is known: wheel (for the wheel and editable hooks).
def get_requires_for_build_wheel(config_settings=None):
    return ["wheel"] + _extra_requires()


def get_requires_for_build_editable(config_settings=None):
    return ["wheel"] + _extra_requires()


def get_requires_for_build_sdist(config_settings=None):
    return _extra_requires()


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _expose_target_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _expose_target_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _expose_target_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _expose_target_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    _expose_target_torch()
    return _setuptools.build_sdist(sdist_directory, config_settings)
