# The two commands of the README: `make demo` and `make test`. Both set up what they need
# (a virtualenv in .venv; as root, QEMU and the Debian kernels for the VM) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test test-quick stress fuzz lint clean bench

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
# examples; AFALG_FUZZ_EXAMPLES=N changes the count), on the host then in the VM on each kernel of
# K (7.3 with crypto.af_alg_restrict=0). E.g. make stress K="6.1 6.12 7.3"
FULL_TIMEOUT ?= 7200
define full_size_run
	AFALG_TEST_SCALE=full $(PY) -m pytest -m "$(1) and not kernel" -p no:cacheprovider --timeout=$(FULL_TIMEOUT) \
	  || [ $$? = 5 ]  # 5: none selected here
	set -e; for k in $(K); do \
	  sysctl=; [ $$k = 7.3 ] && sysctl="--sysctl crypto.af_alg_restrict=0"; \
	  $(VENV)/bin/afalg vm --kernel $$k --cpus 2 --timeout $(FULL_TIMEOUT) $$sysctl \
	    --env AFALG_IN_VM=1 --env AFALG_REQUIRE_KERNEL=1 --env AFALG_TEST_SCALE=full \
	    --env AFALG_FUZZ_EXAMPLES=$${AFALG_FUZZ_EXAMPLES:-2000} --env PYTHONDONTWRITEBYTECODE=1 \
	    -- $(PY) -m pytest -m "$(1) and kernel" -p no:cacheprovider --timeout=$(FULL_TIMEOUT) \
	  || [ $$? = 5 ]; \
	done
endef

stress: $(VENV)/.installed
	$(call full_size_run,stress)

fuzz: $(VENV)/.installed
	$(call full_size_run,fuzz)

demo: $(VENV)/.installed
	$(PY) examples/demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check afalg tests examples bench
	$(VENV)/bin/ruff format --check afalg tests examples bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .vmtmp .pytest_cache build *.egg-info

bench: $(VENV)/.installed
	$(PY) bench/run.py --mib 4 --out bench/RESULTS.md
