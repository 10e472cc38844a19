"""Drive one of the Hypothesis fuzz tests with atheris (coverage-guided, libFuzzer) instead of Hypothesis' own
generator, for long nightly runs beside `make fuzz`:

    pip install atheris
    python tests/fuzz_atheris.py tests/test_fuzz_config.py::test_mutated_value -max_total_time=600

Arguments after the test go to libFuzzer as they are (-max_total_time, -runs, a corpus directory, ...). Any
Hypothesis test whose arguments all come from @given works: Hypothesis exposes it as
`test.hypothesis.fuzz_one_input(bytes)`, which draws the test's arguments from the fuzzer's bytes and raises
what the test raises, so a failed assertion is a libFuzzer crash with its input saved. Tests that also take
pytest fixtures (tmp_path, a model) cannot run this way: `make fuzz` runs those.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path


def load_test(spec: str):
    """'tests/test_fuzz_x.py::test_name' -> the test function (its module imported as the tests import it)."""
    path, sep, name = spec.partition("::")
    file = Path(path)
    if not sep or not name or not file.is_file():
        raise SystemExit(f"error: expected FILE.py::TEST_NAME, got {spec!r}")
    sys.path.insert(0, str(file.resolve().parent))  # the fuzz tests import fuzz_settings from their folder
    mod_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    test = getattr(module, name, None)
    if not callable(test) or not hasattr(test, "hypothesis"):
        raise SystemExit(f"error: {spec} is not a Hypothesis test")
    fixtures = list(inspect.signature(test).parameters)  # @given's own arguments are not in the signature
    if fixtures:
        raise SystemExit(f"error: {spec} takes pytest fixtures ({', '.join(fixtures)}); run it with `make fuzz`")
    return test.hypothesis.fuzz_one_input


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        raise SystemExit(__doc__)
    try:
        import atheris
    except ImportError:
        raise SystemExit("error: atheris is not installed (pip install atheris)") from None
    with atheris.instrument_imports(include=["qwen3lab"]):  # coverage of our code guides the fuzzer
        fuzz_one_input = load_test(argv[1])
    atheris.Setup([argv[0], *argv[2:]], fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
