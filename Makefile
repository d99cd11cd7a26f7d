# `make run` and `make test` set everything up on a fresh machine, then do their job. Both are idempotent:
# the environment is rebuilt only when the lock file, pyproject.toml or the bootstrap script change.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.alignloop-installed
PROTOS  := $(wildcard proto/alignloop/v1/*.proto)
STUBS   := $(patsubst proto/%.proto,%_pb2.py,$(PROTOS))
PYTEST_ARGS ?=
# The suite runs on two pytest-xdist workers, a test file to each at a time (a module's stack is started once).
# Most of its time is spent starting vLLM engines and waiting on real servers, so two workers use a 2-core
# machine's second core: about 25 minutes there. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

.PHONY: setup proto run test test-unit test-gpu bench bench-feedback bench-reward bench-rm-training bench-rm-curve \
	bench-rm-probe bench-rm-sweep bench-ppo bench-rate-limits bench-priorities bench-affinity bench-dtype bench-front-end \
	bench-engine-start bench-trainer-beside-serving clean-state

setup: $(STAMP) $(STUBS)

$(STAMP): scripts/bootstrap.sh requirements/lock-cpu.txt pyproject.toml
	scripts/bootstrap.sh $(VENV)
	touch $@

alignloop/v1/%_pb2.py: proto/alignloop/v1/%.proto $(STAMP)
	@echo "==> generating gRPC stubs from $<"
	$(PY) -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. $<
	touch alignloop/v1/__init__.py

proto: $(STUBS)

run: setup
	$(VENV)/bin/alignloop up

test: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The trainers on a CUDA device (part of `make test` too, where they skip without one).
test-gpu: setup
	$(PY) -m pytest tests/gpu $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/serving.py

bench-feedback: setup
	$(PY) benchmarks/feedback_ingest.py

bench-rate-limits: setup
	$(PY) benchmarks/rate_limits.py

bench-priorities: setup
	$(PY) benchmarks/priorities.py

bench-affinity: setup
	$(PY) benchmarks/affinity.py

bench-dtype: setup
	$(PY) benchmarks/serving_dtype.py

bench-front-end: setup
	$(PY) benchmarks/engine_front_end.py

bench-engine-start: setup
	$(PY) benchmarks/engine_start.py

bench-trainer-beside-serving: setup
	$(PY) benchmarks/trainer_beside_serving.py

bench-reward: setup
	$(PY) benchmarks/reward_scoring.py

bench-rm-training: setup
	$(PY) benchmarks/reward_training.py

bench-rm-curve: setup
	$(PY) benchmarks/reward_learning_curve.py

bench-rm-probe: setup
	$(PY) benchmarks/reward_probe.py

bench-rm-sweep: setup
	$(PY) benchmarks/reward_sweep.py

bench-ppo: setup
	$(PY) benchmarks/ppo_step.py
