# The two commands of the README: `make demo` and `make test`. Both set up what they need
# (a virtualenv in .venv; as root, QEMU and the Debian kernels for the VM) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-quick stress fuzz lint docs clean bench

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,vm]'
	touch $@

# The whole suite: natively if this kernel has AF_ALG and kTLS, else host + VM on 6.1 and 6.12.
test: $(VENV)/.installed
	$(PY) tests/run.py

# Development loop: host tests plus kernel tests on one kernel, e.g. make test-quick K=6.12 T=tests/test_alg_aead.py
K ?= 6.12
test-quick: $(VENV)/.installed
	$(PY) tests/run.py --kernel $(K) $(T)

# Load, soak and fuzzing at full size, outside `make test` (which runs a smoke size of each):
# `make stress` runs the tests marked stress, `make fuzz` the hypothesis tests (thousands of
# examples, 100,000 per target of tests/test_fuzz.py; AFALG_FUZZ_EXAMPLES=N sets every count), on the host then in the VM on each kernel of
# K (7.3 with crypto.af_alg_restrict=0, and at its default). E.g. make stress K="6.1 6.12 7.3"
stress: $(VENV)/.installed
	$(PY) tests/run.py --scale full --select stress $(foreach k,$(K),--kernel $(k))

fuzz: $(VENV)/.installed
	$(PY) tests/run.py --scale full --select fuzz $(foreach k,$(K),--kernel $(k))

demo: $(VENV)/.installed
	$(PY) examples/demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check afalg tests examples bench
	$(VENV)/bin/ruff format --check afalg tests examples bench
	$(VENV)/bin/mypy

# The documentation (API reference, the afalg command, the guides) into docs/_build/html, warnings
# as errors, as tests/test_docs.py builds it.
docs: $(VENV)/.installed
	$(PY) -m sphinx -W -n --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .venv-3.* .vmtmp .pytest_cache build *.egg-info docs/_build

# Benchmarks (bench/run.py): one run on each kernel of make test in the VM (7.3 with
# crypto.af_alg_restrict=0), five rounds per figure; writes bench/RESULTS.md (its header: the
# commit, the time, the host's load before and after each VM) and bench/results.png. Needs the
# bench extra (matplotlib, aiofastnet, the frameworks) and, as root, installs strace with apt.
# K="6.12" for one kernel.
$(VENV)/.bench-installed: $(VENV)/.installed setup.cfg
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

BENCH_KERNELS ?= 6.12 7.3 6.1
bench: $(VENV)/.bench-installed
	$(PY) bench/run.py $(foreach k,$(if $(filter command line,$(origin K)),$(K),$(BENCH_KERNELS)),--kernel $(k))
