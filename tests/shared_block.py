# ----------------------------------------------------------------------------------------------------------------------
# Shared setup. This block is the same in every method file (tests/test_shared.py fails when a copy differs): flags
# from Config, user errors, device and autocast, random state, atomic checkpoints, torchrun (DDP). It expects METHOD,
# Config, PRESETS, check_config(cfg, mode) and main(argv, mode) around it.


def parse_config(argv, mode="train"):
    """Flags generated from Config (help = the field's comment); explicit flag > --preset > Config default."""
    notes = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M))
    p = data.ArgParser(prog=f"{METHOD}.py", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else {"type": type(f.default)}
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                       help=f"{notes.get(f.name, '')} (default {f.default!r})".replace("%", "%%"), **kind)
    given = vars(p.parse_args(argv))  # only the flags on the command line
    preset = given.get("preset", Config.preset)
    if preset not in PRESETS:
        raise data.UserError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], **given})
    check_config(cfg, mode)
    return cfg


def cli(argv=None, mode="train"):
    """`python <method>.py [sample] [flags]`: a user's mistake (data.UserError) -> one line `error: ...`, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["train"], ["sample"]):
        mode, argv = argv[0], argv[1:]
    try:
        return main(argv, mode)
    except data.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def pick_device(name):
    """auto -> cuda, mps, cpu; under torchrun each rank takes cuda:LOCAL_RANK. An unavailable device -> UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    ok = {"cpu": True, "mps": torch.backends.mps.is_available(), "cuda": torch.cuda.is_available()}
    if not ok.get(name.split(":")[0], False):
        raise data.UserError(f"--device {name}: not available here (torch {torch.__version__} sees no CUDA GPU)"
                             if name.startswith("cuda") else f"--device {name!r}: expected auto, cpu, cuda[:N] or mps")
    return torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if name == "cuda" and "LOCAL_RANK" in os.environ else name)


def autocast(device, dtype):  # mixed precision (--dtype bfloat16 / float16); float32 is a no-op
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")


def grad_scaler(device, dtype):  # loss scaling, needed for float16 only
    return torch.amp.GradScaler(device.type, enabled=dtype == "float16")


def seed_all(seed):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def rng_state(gens=()):
    """Every random stream (python, numpy, torch CPU/CUDA, the run's own torch / numpy generators such as the data
    order) as tensors and numbers, so that checkpoints load with weights_only and a resume draws the same numbers."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=(kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                gens=[g.get_state() if isinstance(g, torch.Generator) else g.bit_generator.state for g in gens])


def set_rng_state(state, gens=()):
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for g, s in zip(gens, state["gens"]):
        g.set_state(s) if isinstance(g, torch.Generator) else setattr(g.bit_generator, "state", s)


def save_checkpoint(path, obj):
    """Atomic (a temporary file, then rename: a run killed at any moment leaves the last checkpoint whole); records
    the method and the synthetic world's version (train.py retrains when either differs); rank 0 writes."""
    if is_main():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"method": METHOD, "data_version": data.VERSION, **obj}, tmp)
        os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """save_checkpoint's dict (weights_only=True); a missing or unreadable file, another method's -> UserError."""
    path = Path(path)
    if not path.is_file():
        raise data.UserError(f"no checkpoint at {path} (train first: python {METHOD}.py --out {path.parent})")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise data.UserError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:120]})")
    if not isinstance(ck, dict) or ck.get("method") != METHOD:
        who = ck.get("method", "an older version or another program") if isinstance(ck, dict) else "another program"
        raise data.UserError(f"{path} is a checkpoint of {who}, not of {METHOD}.py")
    return ck


def ddp_setup(device):
    """Under `torchrun --nproc_per_node N`: join the process group (NCCL on GPUs, gloo on CPU). -> (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():  # rank 0 (or a single process): the one that logs, evaluates and writes files
    return not dist.is_initialized() or dist.get_rank() == 0


def check_in_sync(module):
    """Under torchrun every rank must end with rank 0's weights and buffers (state updated outside autograd, such as
    an EMA codebook, must be all-reduced by the method); raises if not."""
    if dist.is_initialized():
        flat = torch.cat([v.detach().double().reshape(-1) for v in module.state_dict().values()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        if not torch.equal(flat, ref):
            raise RuntimeError(f"rank {dist.get_rank()}: weights differ from rank 0's ({(flat - ref).abs().max():.3g})")


def shard(x):
    """This rank's rows of a global batch that every rank drew alike (same generator): DDP's gradient average over
    ranks then equals the single-process gradient of the whole batch."""
    return x[dist.get_rank()::dist.get_world_size()] if dist.is_initialized() else x


# End of the shared setup.
