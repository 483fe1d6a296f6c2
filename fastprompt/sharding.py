"""Frozen weights sharded across torchrun's processes (``--shard-weights``; docs/ARCHITECTURE.md, 'Sharded weights').

Data parallelism (``fastprompt/distributed.py``) replicates the frozen model on every process. Here every
decoder layer is an FSDP2 unit (``torch.distributed.fsdp.fully_shard``, ``reshard_after_forward=True``):
each rank keeps ``1/N`` of the layer's parameters (dim-0 chunks), a layer's forward all-gathers it and frees
the gathered copy right after, and its backward all-gathers it again. The weights are frozen, so nothing is
ever reduced for them; the prompt's gradient is all-reduced as in data parallel training.

What is sharded and what is not:

    decoder layers   sharded (GPT-2's ``transformer.h``, Llama's ``model.layers``, ...): FSDP2 units
    tables           the input embedding table and an untied LM head, ``(V, d)`` each: sharded by rows
                     (``ShardedTable``: a DTensor parameter, ``Shard(0)``, torch.chunk's split as FSDP2's),
                     gathered whole around each use and freed after it
    the rest         position embeddings, final norm: whole on every rank (GPT-2 small: 3 MB of 475)

Tables, not FSDP2 units: FSDP2 cannot group the embedding and a tied head (one parameter in two modules)
without sharding the root module, and the table is read outside any module call (the fused engine's
``W.embed[ids]`` and ``lm_head_ce``; ``models.embedding_table`` for the methods, ``--init`` and the nearest
tokens). So a table gathers itself: a module that holds it (the embedding, the LM head) gathers it in a
forward pre-hook and frees it in its forward hook; ``models.table_weight(module)`` gives the whole tensor to code
that reads the weight itself (the caller keeps it as long as it needs it); ``tables_held(model)`` keeps
every table gathered across a loop of small forwards (decoding). Autograd saves a gathered table by value
(the LM head's backward, relaxed's ``softmax(theta) @ E``): it lives until that backward, which for the LM
head is at once. The methods that read the table every step keep a float copy of it (relaxed, hard, gcg:
the whole table on every rank, as before). Every gather is a collective: the ranks gather in the same
order wherever they call the same modules (lockstep, below); rank 0's outputs are followed by the others
(``train.follow_outputs``).

Why the engine is wrapped (``ShardedDataParallelEngine``) and not only the model:

* **Side channels.** FSDP2 all-gathers a layer for backward when the gradient reaches the layer's *output*.
  The generic engine's trunk runs as its own forward and leaves its K/V in a cache that the suffixes'
  forward reads: the trunk's ``k``/``v`` projections get their gradient through the cache, not through the
  layer's output, and may be reached after FSDP freed the layer. So every frozen layer weight that autograd
  saves is saved as a reference (``saved_tensors_hooks``: ``_ParamRef``), and unpacking it all-gathers the
  layer again where it is not gathered. A last identity on the prompt (``_ReshardAfterBackward``) frees
  every gathered layer once the prompt's gradient is complete.
* **Lockstep.** All-gathers are collectives: every rank must gather the same layers in the same order.
  The engines' control flow depends on the batch (how many forwards a step takes: packs, empty suffixes,
  the layout check of the first batch), so a rank's shard alone could make it take another path than its
  neighbours and gather the wrong layer (silently, where shapes agree) or hang. Every rank holds the whole
  global batch, so every rank computes every shard's path (``path_signature``); where all shards take the
  same path each rank computes its own shard, otherwise (an empty shard, shards on different paths, the
  generic layout not yet decided) every rank computes the whole batch and ranks other than 0 count zero: the
  same result, ``N`` times the compute, for that batch only.

Outside a training step no wrapper is needed: evaluation and decoding run with the same batches on every
rank (``evaluate``, ``greedy``: all ranks take part; rank 0 alone writes), and forwards without grad need
nothing but FSDP2's own hooks.

Loading (``load_sharded``): a local directory of safetensors is built on the meta device, sharded, and each
rank reads only its chunk of every layer tensor (``safe_open(...).get_slice``) plus the unsharded rest: no
full copy on any rank. Other names (``tiny``, ``random:*``, hub names, ``gemma3-270m``) are loaded whole on
every rank by ``models.load_model`` and then sharded (the layers' other chunks are freed): a transient full
copy per process, fine for the small models these are.

Engines: all three. The fused engine reads its weights outside any module call, so FSDP2's hooks never
gather for it: it reads each layer through ``LayerGather`` (explicit ``unshard``/``reshard``, a layer
gathered only while it runs, forward and backward; its saved weights are ``_BlockRef``s). Prefix-tuning through
``gpt2_reference_forward`` (its init, the naive engine, the generic engine where a field precedes the slot,
decoding after a field) calls a block's submodules directly; ``gathered`` gathers the block around that use.
"""
from __future__ import annotations

import contextlib
import json
import os
import weakref
from typing import Any

import torch

from .errors import ConfigError, ModelError

LAYER_LISTS = ("h", "layers", "blocks")  # the decoder's ModuleList of layers (GPT-2, Llama/Qwen/Gemma, ...)
RUN_HINT = "torchrun --nproc_per_node N -m fastprompt.train ... --shard-weights (N >= 2)"


# ------------------------------------------------------------------------------------------ checks
def check_context(ctx) -> None:
    """``--shard-weights`` needs torchrun with two or more processes (``ConfigError`` otherwise)."""
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError(f"--shard-weights shards the weights across torchrun's processes: run {RUN_HINT}")
    if not ctx.active:
        raise ConfigError("--shard-weights with one process shards nothing: use torchrun --nproc_per_node 2 or "
                          "more, or drop --shard-weights")


def check_engine(name: str) -> str:
    """The engine to run on sharded weights. Every engine shards (``naive`` and ``generic`` through the
    layers' own forwards, ``fused`` through ``LayerGather``); ``auto`` is resolved as without sharding
    (``fused`` where the model has a family). Kept as the one place a future engine that cannot shard is
    refused (``ConfigError``)."""
    return name


# ------------------------------------------------------------------------------------------ sharding
def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder's layers, in order (the FSDP units)."""
    base = getattr(model, "base_model", None)
    for holder in (base, getattr(base, "decoder", None), getattr(base, "language_model", None)):
        for attr in LAYER_LISTS:
            layers = getattr(holder, attr, None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers):
                return list(layers)
    raise ConfigError(f"--shard-weights: no list of decoder layers found in {type(model).__name__} "
                      f"(looked for base_model.{{{', '.join(LAYER_LISTS)}}})")


def sharded_weights(model) -> "ShardedWeights | None":
    """The ``ShardedWeights`` of a model sharded by ``shard_model``, or None."""
    return getattr(model, "_fastprompt_shards", None)


def shard_model(model, mesh=None) -> "ShardedWeights":
    """Shard ``model``'s decoder layers over the default process group (or ``mesh``), in place."""
    existing = sharded_weights(model)
    return existing if existing is not None else ShardedWeights(model, mesh)


class _ParamRef:
    """A frozen layer weight (or a view of one) saved for backward by reference, not by value."""

    __slots__ = ("layer", "name", "size", "stride", "offset")

    def __init__(self, layer, name, t):
        self.layer, self.name = layer, name
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class ShardedWeights:
    """The FSDP2 units of one model: one per decoder layer (see the module docstring)."""

    def __init__(self, model, mesh=None):
        from torch.distributed.fsdp import fully_shard

        self.layers = decoder_layers(model)
        for layer in self.layers:
            if any(p.requires_grad for p in layer.parameters()):
                raise ConfigError("--shard-weights shards frozen weights only; this model has trainable layer "
                                  "parameters")
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
            # after FSDP2's pre-forward (the layer gathered) and before its post-forward (freed)
            layer.register_forward_pre_hook(self._enter_hook)
            layer.register_forward_hook(self._leave_hook, prepend=True)
        self._current = None  # the layer being computed: its gathered parameters by storage address
        self._ptrs: dict[int, tuple[Any, str, int]] = {}
        self._gathered: set = set()  # layers gathered by an unpack, freed after the backward
        self._derived: dict[int, tuple[Any, int, tuple, int]] = {}  # the fused engine's live layer tensors
        self.layer_gathers = weakref.WeakSet()  # LayerGather of fused engines on this model (freed by reshard)
        mesh = next(self.layers[0].parameters()).device_mesh
        self.tables = [ShardedTable(model, m, mesh) for m in _table_modules(model)]
        model._fastprompt_shards = self

    # -- which saved tensors are layer weights
    def _enter(self, layer) -> None:
        self._current = layer
        self._ptrs = {}
        for name, p in layer.named_parameters():
            if not _is_dtensor(p) and p.numel():
                self._ptrs[p.untyped_storage().data_ptr()] = (layer, name, p.untyped_storage().nbytes())

    def _enter_hook(self, layer, args):
        self._enter(layer)

    def _leave_hook(self, layer, args, output):
        self._current, self._ptrs = None, {}

    def _pack(self, t):
        if (self._current is None and not self._derived) or t.requires_grad or _is_dtensor(t):
            return t
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        hit = self._ptrs.get(ptr)
        if hit is not None and nbytes == hit[2]:
            return _ParamRef(hit[0], hit[1], t)
        hit = self._derived.get(ptr)
        if hit is not None and nbytes == hit[3]:
            return _BlockRef(hit[0], hit[1], hit[2], t)
        return t

    def _unpack(self, x):
        if isinstance(x, _BlockRef):  # a fused engine's layer tensor: that layer gathered and read again
            return _path(x.gather.block(x.index), x.path).as_strided(x.size, x.stride, x.offset)
        if not isinstance(x, _ParamRef):
            return x
        p = x.layer.get_parameter(x.name)
        if _is_dtensor(p):  # freed since the forward: gather the layer again (freed after the backward)
            x.layer.unshard()
            self._gathered.add(x.layer)
            p = x.layer.get_parameter(x.name)
        return p.as_strided(x.size, x.stride, x.offset)

    def saving(self):
        """Layer weights saved for backward by reference while this context is open."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @contextlib.contextmanager
    def gathered(self, layer):
        """``layer`` gathered around code that calls its submodules directly (``gpt2_reference_forward``)."""
        if not hasattr(layer, "unshard"):
            yield
            return
        layer.unshard()
        self._enter(layer)
        try:
            yield
        finally:
            self._current, self._ptrs = None, {}
            layer.reshard()

    def reshard(self) -> None:
        for layer in self._gathered:
            layer.reshard()
        self._gathered.clear()
        for gather in self.layer_gathers:
            gather.release()

    # -- memory accounting (benchmarks/shard_memory.py)
    def local_bytes(self, model) -> dict[str, int]:
        """Parameter bytes this rank holds: its layer shards, its table shards and the unsharded rest."""
        def nbytes(p):
            return _local(p).numel() * p.element_size()

        sharded = sum(nbytes(p) for layer in self.layers for p in layer.parameters())
        tables = sum(nbytes(t.sharded) for t in self.tables)
        seen = {id(p) for layer in self.layers for p in layer.parameters()} | {id(t.sharded) for t in self.tables}
        rest = sum(nbytes(p) for p in model.parameters() if id(p) not in seen)
        return {"layer_shards": sharded, "table_shards": tables, "unsharded": rest}


# ------------------------------------------------------------------------------------------ tables
def _table_modules(model) -> list[torch.nn.Module]:
    """The modules whose ``weight`` is a ``(V, d)`` table: the input embedding and an untied LM head (a tied
    head shares the embedding's parameter: one table)."""
    out = []
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not any(weight is m.weight for m in out):
            out.append(module)
    return out


class ShardedTable:
    """A frozen ``(V, d)`` table sharded by rows over the layers' mesh (module docstring, 'Tables'). Every
    module holding the parameter (the embedding and a tied head) holds the sharded DTensor, so shape, dtype
    and device read as the table's and a use that was not gathered fails loudly (a DTensor beside a plain
    tensor). ``acquire`` gathers it (the first holder), ``release`` frees it (the last)."""

    def __init__(self, model, module: torch.nn.Module, mesh):
        from torch.distributed.tensor import DTensor, Shard

        weight = module.weight
        if weight.requires_grad:
            raise ConfigError("--shard-weights shards frozen weights only; this model's embedding table is trainable")
        self.users = [(m, name) for m in model.modules() for name, p in m._parameters.items() if p is weight]
        self.mesh, self.shape, self.stride = mesh, tuple(weight.shape), weight.stride()
        self.rows = rows_of(self.shape[0], mesh)
        start, stop = self.rows
        local = (torch.empty((stop - start, *self.shape[1:]), dtype=weight.dtype, device="meta") if weight.is_meta
                 else weight.detach()[start:stop].clone())
        self._dtensor, self._shard = DTensor, Shard
        self.sharded = self._wrap(local)
        self.count, self.full = 0, None
        self._set(self.sharded)
        for m, _ in self.users:
            m._fastprompt_table = self
            m.register_forward_pre_hook(self._pre_hook)
            m.register_forward_hook(self._post_hook, always_call=True)

    def _pre_hook(self, module, args) -> None:
        self.acquire()

    def _post_hook(self, module, args, output) -> None:
        self.release()

    def _wrap(self, local: torch.Tensor) -> torch.nn.Parameter:
        dt = self._dtensor.from_local(local, self.mesh, [self._shard(0)], run_check=False, shape=self.shape,
                                      stride=self.stride)
        return torch.nn.Parameter(dt, requires_grad=False)

    def _set(self, param) -> None:
        for m, name in self.users:
            m._parameters[name] = param

    @property
    def loaded(self) -> bool:
        return not self.sharded.to_local().is_meta

    def fill(self, chunk: torch.Tensor) -> None:
        """This rank's rows, read from a checkpoint (``load_sharded``)."""
        self.sharded = self._wrap(chunk.to(dtype=self.sharded.dtype))
        self._set(self.sharded)

    def acquire(self) -> torch.Tensor:
        """The whole table (gathered where no holder has it): a collective on the first holder."""
        if self.count == 0:
            self.full = torch.nn.Parameter(self.sharded.full_tensor(), requires_grad=False)
            self._set(self.full)
        self.count += 1
        return self.full

    def release(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._set(self.sharded)
            self.full = None


def rows_of(n_rows: int, mesh) -> tuple[int, int]:
    """This rank's ``[start, stop)`` rows of a dim-0 shard (torch.chunk's split, FSDP2's and DTensor's)."""
    rows = -(-n_rows // mesh.size())
    start = min(mesh.get_local_rank() * rows, n_rows)
    return start, min(start + rows, n_rows)


@contextlib.contextmanager
def tables_held(model):
    """Every sharded table of ``model`` gathered once for the block (decoding's many small forwards)."""
    weights = sharded_weights(model)
    tables = weights.tables if weights is not None else []
    for t in tables:
        t.acquire()
    try:
        yield
    finally:
        for t in tables:
            t.release()


@contextlib.contextmanager
def gathered(model, layer):
    """``layer`` of ``model`` gathered where the model is sharded (a no-op otherwise)."""
    weights = sharded_weights(model)
    if weights is None:
        yield
    else:
        with weights.gathered(layer):
            yield


class _BlockRef:
    """A fused engine's layer tensor (a view of a gathered parameter, or a copy made from them: q/k/v
    concatenated, a bf16 copy) saved for backward by its place in the layer's ``Block``, not by value."""

    __slots__ = ("gather", "index", "path", "size", "stride", "offset")

    def __init__(self, gather, index, path, t):
        self.gather, self.index, self.path = gather, index, path
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class LayerGather:
    """The fused engine's layers over sharded weights (``engines/fused.py`` reads its layers through
    ``block``). The engine reads the weights outside the layers' modules, so FSDP2's forward hooks never
    run: ``block(i)`` gathers layer ``i`` explicitly (``FSDPModule.unshard``), reads its ``Block`` from the
    gathered parameters (``families.read_block``) and frees the layers more than one away (``reshard``): at
    most two layers gathered in the forward (a layer and the next, whose first norm ends it), three in the
    backward. Every tensor of a gathered ``Block`` is known to ``ShardedWeights``'s saved-tensor hooks, so
    what the ops save of it for the input-gradient-only backward is a ``_BlockRef``: unpacking it calls
    ``block(i)`` again, which gathers the layer where it was freed. ``release`` (end of the forward, end of
    the backward: ``ShardedWeights.reshard``) frees every layer it gathered. Collectives: the ranks must
    call ``block`` in the same order, which they do where they compute the same layers in the same order
    (``distributed.path_signature``)."""

    def __init__(self, model, weights: ShardedWeights, dtype=None):
        self.model, self.weights, self.dtype = model, weights, dtype
        self.live: dict[int, Any] = {}  # layer index -> its Block, read while gathered
        self._ptrs: dict[int, list[int]] = {}  # layer index -> the storages it registered
        weights.layer_gathers.add(self)

    def block(self, i: int):
        blk = self.live.get(i)
        if blk is not None and not _is_dtensor(next(self.weights.layers[i].parameters())):
            return blk
        for j in [j for j in self.live if abs(j - i) > 1]:
            self._free(j)
        from .families import read_block

        layer = self.weights.layers[i]
        layer.unshard()
        blk = read_block(self.model, i, self.dtype)
        self.live[i] = blk
        ptrs = self._ptrs[i] = []
        for path, t in _block_tensors(blk):
            storage = t.untyped_storage()
            self.weights._derived.setdefault(storage.data_ptr(), (self, i, path, storage.nbytes()))
            ptrs.append(storage.data_ptr())
        return blk

    def _free(self, i: int) -> None:
        self.live.pop(i, None)
        for ptr in self._ptrs.pop(i, ()):
            hit = self.weights._derived.get(ptr)
            if hit is not None and hit[0] is self and hit[1] == i:
                del self.weights._derived[ptr]
        self.weights.layers[i].reshard()

    def release(self) -> None:
        for i in list(self.live):
            self._free(i)


def layer_gather(model, dtype=None) -> LayerGather | None:
    """The ``LayerGather`` of a fused engine on ``model`` where its layers are sharded, else None."""
    weights = sharded_weights(model)
    return None if weights is None else LayerGather(model, weights, dtype)


def _block_tensors(obj, path=()):
    """(path, tensor) of every weight in a ``families.base.Block`` (RoPE frequencies left out: buffers,
    never sharded)."""
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "rotary":
            continue
        if torch.is_tensor(value):
            yield path + (f.name,), value
        elif dataclasses.is_dataclass(value):
            yield from _block_tensors(value, path + (f.name,))


def _path(obj, path):
    for name in path:
        obj = getattr(obj, name)
    return obj


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(p):
    return p.to_local() if _is_dtensor(p) else p


# ------------------------------------------------------------------------------------------ the step
class _ReshardAfterBackward(torch.autograd.Function):
    """Identity on the prompt; its backward (the last node before the prompt: every use of a weight is done)
    frees the layers that unpacks gathered."""

    @staticmethod
    def forward(ctx, prompt, weights):
        ctx.weights = weights
        return prompt.view_as(prompt)

    @staticmethod
    def backward(ctx, grad):
        ctx.weights.reshard()
        return grad, None


# ------------------------------------------------------------------------------------------ loading
def load_sharded(name: str, *, seed: int = 0, device=None, dtype=None):
    """``(model, tokenizer)``, the decoder layers sharded over the process group. A local directory of
    safetensors: built on the meta device, each rank reading its chunks only; anything else:
    ``models.load_model`` on every rank, then sharded (module docstring)."""
    from .models import load_model

    device = torch.device(device or "cpu")
    files = _safetensors_files(name) if isinstance(name, str) and os.path.isdir(name) else None
    if not files:
        model, tokenizer = load_model(name, seed=seed, device=device, dtype=dtype)
        shard_model(model)
        return model, tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as e:
        raise ModelError(f"could not read the config of {name!r}: {str(e).strip().splitlines()[0][:200]}") from None
    with _params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.eval().requires_grad_(False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # one parameter again (built on meta, the head got its own): one table
    shard_model(model)
    _load_shards(model, files, device)
    tokenizer = _tokenizer(name, config)
    model.config._name_or_path = name
    return model, tokenizer


def _safetensors_files(directory: str) -> dict[str, str] | None:
    """Tensor name -> file, from ``model.safetensors`` or a sharded checkpoint's index; None if neither."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    single = os.path.join(directory, "model.safetensors")
    if not os.path.exists(single):
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


@contextlib.contextmanager
def _params_on_meta():
    """Parameters created on the meta device, buffers where they are (rotary tables, masks: computed, not
    stored in the checkpoint)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(module._parameters[name].to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _load_shards(model, files: dict[str, str], device) -> None:
    """Fill the meta parameters from the checkpoint on ``device``: a layer parameter (an FSDP2 DTensor) with
    this rank's dim-0 chunk (FSDP2's ``torch.chunk`` split), every other parameter whole, put in place as
    read (tied parameters stay one). Each tensor is read through its own ``safe_open``, so the file's pages
    are mapped one tensor at a time."""
    from safetensors import safe_open

    def read(pname, rows=None):
        key = pname if pname in files else _alias(pname, files)
        if key is None:
            return None
        with safe_open(files[key], framework="pt", device="cpu") as f:
            tensor = f.get_slice(key)
            return tensor[rows[0]:rows[1]] if rows is not None else tensor[:]

    weights = sharded_weights(model)
    for layer in weights.layers:  # the chunks: allocated by to_empty, then filled
        buffers = {name: b.detach().clone() for name, b in layer.named_buffers()}  # computed at build: kept
        layer.to_empty(device=device)
        with torch.no_grad():
            for name, b in layer.named_buffers():
                b.copy_(buffers[name])
    done: dict[int, torch.nn.Parameter] = {}  # id of a meta parameter -> its loaded one (tied weights)
    for mname, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            pname = f"{mname}.{name}" if mname else name
            with torch.no_grad():
                table = getattr(module, "_fastprompt_table", None)
                if table is not None and p is table.sharded:
                    if not table.loaded:  # a table: this rank's rows
                        chunk = read(pname, table.rows)
                        if chunk is not None:
                            table.fill(chunk.to(device))
                elif _is_dtensor(p):
                    local = p.to_local()
                    rows = -(-p.shape[0] // p.device_mesh.size())  # chunk size
                    start = p.device_mesh.get_local_rank() * rows
                    chunk = read(pname, (start, start + local.shape[0])) if local.shape[0] else local
                    if chunk is None:
                        raise ModelError(f"the checkpoint has no tensor {pname!r}: not a checkpoint of this config")
                    local.copy_(chunk)
                elif id(p) in done:
                    module._parameters[name] = done[id(p)]
                elif p.is_meta:
                    tensor = read(pname)
                    if tensor is not None:
                        loaded = torch.nn.Parameter(tensor.to(device=device, dtype=p.dtype), requires_grad=False)
                        done[id(p)] = module._parameters[name] = loaded
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the LM head: stored once, as the input embedding
    missing = [n for n, p in model.named_parameters() if (p.to_local() if _is_dtensor(p) else p).is_meta]
    if missing:
        raise ModelError(f"the checkpoint has no tensor {missing[0]!r}: not a checkpoint of this config")


def _alias(pname: str, files) -> str | None:
    """The checkpoint's name for a parameter stored under another prefix (``model.`` / ``transformer.``)."""
    for key in files:
        if key.endswith("." + pname) or pname.endswith("." + key):
            return key
    return None


def _tokenizer(name: str, config):
    from transformers import AutoTokenizer

    from .models import gpt2_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
            raise ValueError("empty tokenizer")
    except Exception:
        if getattr(config, "model_type", None) != "gpt2":
            raise ModelError(f"could not load the tokenizer of {name!r}; save it next to the model") from None
        tokenizer = gpt2_tokenizer()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
