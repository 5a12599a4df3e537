"""Build fastattn: a CUDA extension when torch has CUDA and nvcc is found, else CPU only.

Environment:
  FASTATTN_REQUIRE_CUDA=1   fail instead of falling back to a CPU-only build (CI sets it)
  FASTATTN_FORCE_CPU=1      build the CPU-only extension even where CUDA is available
  FASTATTN_CUDA_ARCHS       e.g. "8.0;9.0" (default: the local GPU's, else "8.0;9.0")
  FASTATTN_HDIMS            narrowed dev build, e.g. "128" or "64,128" (default: all)
  FASTATTN_DTYPES           narrowed dev build, e.g. "bf16" (default: "fp16,bf16")
  FASTATTN_NVCC_EXTRA       extra nvcc flags for A/B builds, e.g. "-DFASTATTN_DECODE_WARPS=8"
  MAX_JOBS                  parallel compile jobs (honoured by torch's ninja builder)
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_instantiations():
    """csrc/cuda/instantiations.py: the one list of compiled (family, head dim, dtype) units."""
    spec = importlib.util.spec_from_file_location(
        "fastattn_instantiations", os.path.join(ROOT, "csrc", "cuda", "instantiations.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


INSTANTIATIONS = _load_instantiations()
ALL_HDIMS = INSTANTIATIONS.HEAD_DIMS
ALL_DTYPES = tuple(INSTANTIATIONS.DTYPES)
GENERATED_DIR = os.path.join("build", "generated", "cuda")


def _test_requirements():
    with open(os.path.join(ROOT, "tests", "requirements.txt")) as f:
        return [l.strip() for l in f if l.strip() and not l.startswith("#")]


def _env_list(name, default):
    raw = os.environ.get(name, "").replace(";", ",").strip()
    if not raw:
        return list(default)
    return [x.strip() for x in raw.split(",") if x.strip()]


def _cuda_available_for_build():
    """(ok, reason): whether the CUDA extension can be built here."""
    if os.environ.get("FASTATTN_FORCE_CPU") == "1":
        return False, "FASTATTN_FORCE_CPU=1"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None or not (
        shutil.which("nvcc") or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    ):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


def _cuda_archs():
    raw = os.environ.get("FASTATTN_CUDA_ARCHS", "").strip()
    if not raw:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            raw = f"{major}.{minor}"
        else:
            raw = "8.0;9.0"
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    flags = []
    for arch in archs:
        num = arch.replace(".", "").replace("+PTX", "")
        # Hopper builds as sm_90a: the wgmma forward exists only in that
        # machine code (every other image gets the sm80 kernels), and sm_90a
        # runs on every sm90 GPU.
        if num == "90":
            num = "90a"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


# Some toolchains (e.g. a GCC installed under /opt) link libstdc++ statically
# into shared objects. With Python's -Bsymbolic-functions, the extension's
# copy of the iostream code then runs against the process's (torch's dynamic
# libstdc++) locale data, and formatting a number into an error message
# (c10::str -> ostringstream << int64) crashes. Hiding the static copy's
# symbols keeps it self-consistent; without a static libstdc++ this is a no-op.
LINK_ARGS = ["-fopenmp", "-Wl,--exclude-libs,libstdc++.a"]


def _host_cxx_std():
    """C++ standard of the host (torch-facing) code: what torch's headers demand.

    torch >= 2.12's ATen needs C++20; older releases build as C++17. The CUDA
    kernels include no torch header and always build as C++17, so the machine
    code does not depend on the torch release.
    """
    from torch.utils import cpp_extension

    aten = os.path.join(cpp_extension.include_paths()[0], "ATen", "ATen.h")
    try:
        with open(aten) as f:
            needs_20 = "C++20" in f.read()
    except OSError:
        needs_20 = False
    return "c++20" if needs_20 else "c++17"


def build_extension():
    from torch.utils import cpp_extension

    # csrc/: the op schemas and the module stub; torch/: argument checks and the
    # CUDA glue (*_cuda.cpp, CUDA builds only); cpu/: the CPU kernels.
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/torch/*.cpp") +
                         glob.glob("csrc/cpu/*.cpp"))
    cuda_glue = sorted(glob.glob("csrc/torch/*_cuda.cpp"))
    cpp_sources = [s for s in cpp_sources if s not in cuda_glue]
    # Debug information is opt-in (FASTATTN_DEBUG_INFO=1: host -g and device -lineinfo, for
    # profilers' and compute-sanitizer's source lines): the wheel users install carries
    # machine code only. Line tables of the heavily unrolled kernels were about three
    # quarters of the device code, and host debug info another quarter of the extension.
    debug_info = os.environ.get("FASTATTN_DEBUG_INFO") == "1"
    cxx_flags = ["-O3", f"-std={_host_cxx_std()}", "-fopenmp"] + ([] if debug_info else ["-g0"])
    include_dirs = [os.path.join(ROOT, "csrc")]

    use_cuda, reason = _cuda_available_for_build()
    if not use_cuda:
        if os.environ.get("FASTATTN_REQUIRE_CUDA") == "1":
            sys.exit(f"fastattn: FASTATTN_REQUIRE_CUDA=1 but the CUDA build is skipped: {reason}")
        print(f"fastattn: building the CPU-only extension ({reason})")
        return cpp_extension.CppExtension(
            "fastattn._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=LINK_ARGS,
        )

    hdims = [int(h) for h in _env_list("FASTATTN_HDIMS", ALL_HDIMS)]
    dtypes = _env_list("FASTATTN_DTYPES", ALL_DTYPES)
    bad = [h for h in hdims if h not in ALL_HDIMS] + [d for d in dtypes if d not in ALL_DTYPES]
    if bad:
        sys.exit(f"fastattn: unknown FASTATTN_HDIMS/FASTATTN_DTYPES entries {bad}")
    # Hand-written units (dispatchers, merge, append) plus the generated
    # per-(head dim, dtype) instantiations this build selects.
    cu_sources = sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
    cu_sources += INSTANTIATIONS.write_units(GENERATED_DIR, hdims, dtypes)
    defines = [f"-DFASTATTN_ENABLE_HDIM{h}" for h in hdims]
    defines += [f"-DFASTATTN_ENABLE_{d.upper()}" for d in dtypes]
    defines += ["-DFASTATTN_WITH_CUDA"]
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + (["-lineinfo"] if debug_info else []) + _cuda_archs() + defines
    # Dev A/B builds: extra nvcc flags, e.g. tuning macros of the kernels.
    nvcc_flags += os.environ.get("FASTATTN_NVCC_EXTRA", "").split()
    if os.environ.get("FASTATTN_NVCC_THREADS"):
        nvcc_flags += ["--threads", os.environ["FASTATTN_NVCC_THREADS"]]
    print(f"fastattn: building the CUDA extension (hdims {hdims}, dtypes {dtypes}, "
          f"{len(cu_sources)} .cu files, flags {_cuda_archs()})")
    return cpp_extension.CUDAExtension(
        "fastattn._C",
        cpp_sources + cuda_glue + cu_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": nvcc_flags},
        extra_link_args=LINK_ARGS,
    )


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="fastattn",
        version="0.1.0",
        description="IO-aware attention kernels for PyTorch (FlashAttention, decoding, paged KV)",
        package_dir={"": "python"},
        packages=find_packages("python"),
        ext_modules=[build_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
        extras_require={"test": _test_requirements()},
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
