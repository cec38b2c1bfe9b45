"""Property-based fuzzing with hypothesis: the ttrpc codec, request decoding, the Task service.

hypothesis rather than atheris: it is pure Python (atheris needs a native build against a
clang/libFuzzer toolchain), runs as ordinary pytest tests in the normal suite, shrinks a
failure to a minimal input, and generates structured inputs (frames, protobuf messages, call
sequences) as well as raw bytes. What it gives up is coverage guidance.

    .venv/bin/python -m pytest tests/fuzz                                # short: CI's run, a few s
    PYSHIM_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/fuzz     # long

The example database is tests/fuzz/corpus: read-only in the short run, so CI never changes the
checkout; a long run adds every failing input it finds there (commit them). Inputs worth keeping
for good are `@example`s beside the tests.
"""
import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

CORPUS = DirectoryBasedExampleDatabase(str(Path(__file__).parent / "corpus"))
EXAMPLES = os.environ.get("PYSHIM_FUZZ_EXAMPLES")

settings.register_profile(
    "pyshim-fuzz",
    max_examples=int(EXAMPLES) if EXAMPLES else 25,
    database=CORPUS if EXAMPLES else ReadOnlyDatabase(CORPUS),
    deadline=None,  # a shared 2-core machine: timing says nothing here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile("pyshim-fuzz")
