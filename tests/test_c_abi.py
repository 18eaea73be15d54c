"""src_c/ stands alone: the C test program builds against fastopt.h and the .c
files with nothing else (no Python) and passes, with and without OpenMP, with
cc and clang, cross-built for other CPUs and run as older x86-64 ones; so does
the README's example."""
import glob
import os
import platform
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool(name, required_by):
    """The program `name`, or skip; or fail when $`required_by` is 1 (CI
    installed it, so its tests must not skip)."""
    if shutil.which(name) is None:
        if os.environ.get(required_by) == "1":
            pytest.fail(f"no {name!r}")
        pytest.skip(f"no {name!r}")
    return name


def compiler(name="cc"):
    """$CC (default cc), or clang: embedders build src_c/ with either, and
    each has its own way to dispatch (parallel.h)."""
    if name == "cc":
        return tool(os.environ.get("CC", "cc"), "FASTOPT_REQUIRE_TORCH")
    return tool(name, "FASTOPT_REQUIRE_CLANG")


FLAGS = ["-std=c99", "-O2", "-Wall", "-Werror", "-fno-math-errno"]


def compilers():
    """cc, and clang where it is installed (compiler() says why not)."""
    return ["cc"] + (["clang"] if shutil.which("clang") else [])


def start_compiling_src_c(cc, flags, out_dir):
    """Start compiling each src_c/*.c to an object in out_dir, all at once (one
    file takes most of the time); returns ([object paths], [processes])."""
    objects, jobs = [], []
    for src in sorted(glob.glob(os.path.join(ROOT, "src_c", "*.c"))):
        objects.append(os.path.join(out_dir, os.path.basename(src)[:-2] + ".o"))
        jobs.append(subprocess.Popen([cc, *flags, "-I", os.path.join(ROOT, "src_c"), "-c", src,
                                      "-o", objects[-1]],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return objects, jobs


def wait_compiled(jobs):
    for job in jobs:
        log = job.communicate()[0]
        assert job.returncode == 0, log     # -Werror: warnings fail too


@pytest.fixture(scope="module")
def src_c_objects(tmp_path_factory):
    """The object files of src_c/*.c per compiler and OpenMP setting (the slow
    part: every kernel three times over, for target_clones), all of them
    built at once at the first use: one file takes most of the time."""
    built = {}

    def objects(openmp, cc="cc"):
        compiler(cc)      # fails or skips here when it is missing
        if not built:
            jobs = []
            for key in [(o, c) for c in compilers() for o in (True, False)]:
                out = tmp_path_factory.mktemp(("openmp-" if key[0] else "serial-") + key[1])
                built[key], started = start_compiling_src_c(
                    compiler(key[1]), FLAGS + (["-fopenmp"] if key[0] else []), str(out))
                jobs += started
            wait_compiled(jobs)
        return built[openmp, cc]
    return objects


def build_and_run(source, exe, objects, openmp, cc, runner=()):
    """Compile source against fastopt.h with compiler `cc`, link it with
    src_c's objects only, run it (under `runner`: qemu for another CPU)."""
    subprocess.run([cc, *FLAGS, "-I", os.path.join(ROOT, "src_c"), source, *objects,
                    "-lm", "-o", exe] + (["-fopenmp"] if openmp else []),
                   check=True, capture_output=True, text=True)
    r = subprocess.run([*runner, exe], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("program", ["test_kernels.c", "test_rnn.c"])
@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "serial"])
@pytest.mark.parametrize("cc", ["cc", "clang"])
def test_c_program_builds_and_passes(tmp_path, src_c_objects, openmp, program, cc):
    out = build_and_run(os.path.join(ROOT, "tests", "c", program),
                        str(tmp_path / program[:-2]), src_c_objects(openmp, cc), openmp,
                        compiler(cc))
    assert out.startswith("ok"), out


# Other CPUs than this one: a cross compiler per target, its programs run under
# qemu-user. 32-bit x86 computes in x87 registers (excess precision: a bare
# `(vector){0} + scalar` stopped its build), and runs serial because qemu-i386
# hangs in any two-thread libgomp region (a five-line OpenMP program does too).
CROSS = {"aarch64": ("aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu", True),
         "i686": ("i686-linux-gnu-gcc", "qemu-i386", "/usr/i686-linux-gnu", False)}


def both_c_programs_pass(tmp_path, objects, openmp, cc, runner):
    for program in ("test_kernels.c", "test_rnn.c"):
        out = build_and_run(os.path.join(ROOT, "tests", "c", program), str(tmp_path / program[:-2]),
                            objects, openmp, cc, runner)
        assert out.startswith("ok"), out


@pytest.mark.parametrize("target", sorted(CROSS))
def test_c_programs_build_and_pass_on_other_cpus(tmp_path, target):
    cc, qemu, sysroot, openmp = CROSS[target]
    tool(cc, "FASTOPT_REQUIRE_CROSS")
    tool(qemu, "FASTOPT_REQUIRE_CROSS")
    objects, jobs = start_compiling_src_c(cc, FLAGS + (["-fopenmp"] if openmp else []),
                                          str(tmp_path))
    wait_compiled(jobs)
    both_c_programs_pass(tmp_path, objects, openmp, cc, (qemu, "-L", sysroot))


# Older x86-64 CPUs than this one (AVX-512): the same build, run under
# qemu-x86_64 as a CPU without AVX-512 (Haswell: the AVX2 clones and the
# portable paths) and one without AVX (Nehalem: the baseline clones). QEMU
# raises SIGILL for an instruction its CPU model lacks, so these also show
# that nothing outside its dispatch needs more than the CPU has.
OLDER_X86 = ["Haswell-v4", "Nehalem-v2"]


@pytest.mark.parametrize("cpu", OLDER_X86)
def test_c_programs_pass_on_older_x86_64(tmp_path, src_c_objects, cpu):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86-64 build")
    qemu = tool("qemu-x86_64", "FASTOPT_REQUIRE_CROSS")
    both_c_programs_pass(tmp_path, src_c_objects(True), True, compiler(), (qemu, "-cpu", cpu))


def test_readme_c_example_builds_and_gives_adams_steps(tmp_path, src_c_objects):
    """The README's C example, as written there: 10 Adam steps of a constant
    gradient move each value by about 10 * lr against its gradient's sign."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    code = readme.split("<!-- c-example -->\n```c\n", 1)[1].split("```", 1)[0]
    source = tmp_path / "adam_step.c"
    source.write_text(code)
    got = [float(v) for v in build_and_run(str(source), str(tmp_path / "adam_step"),
                                           src_c_objects(True), True, compiler()).split()]
    # Adam's first steps on a constant gradient are lr * sign(g) each (m/sqrt(v) = sign(g))
    start, grad = [1.0, -2.0, 0.5, 0.25], [0.1, 0.2, -0.3, 1.0]
    want = [p - 10 * 1e-3 * (1 if g > 0 else -1) for p, g in zip(start, grad)]
    assert got == pytest.approx(want, abs=2e-6)
