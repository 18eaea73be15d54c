"""python -m fastopt bench [--threads 1,2] [--quick] [--only adam,norm] [--dtype float32|float64]
                        [--json out.json]"""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):     # asked for: stdout, success
        print(__doc__.strip())
        return 0
    if not argv or argv[0] != "bench":
        print(__doc__.strip(), file=sys.stderr)
        return 2
    from .bench import main as bench_main
    bench_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
