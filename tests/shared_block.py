# ----------------------------------------------------------------------------------------------------------------------
# Shared setup. This block is the same in every method file (tests/test_shared.py fails when a copy differs): it names
# this method for data.py's run-time plumbing (flags from Config, user errors, checkpoints). The rest of that plumbing
# is called as data.X where it is used: pick_device, autocast, grad_scaler, seed_all, rng_state / set_rng_state (exact
# resume), ddp_setup / is_main / shard / check_in_sync (torchrun). It expects METHOD, Config, PRESETS,
# check_config(cfg, mode) and main(argv, mode) around it.


def parse_config(argv, mode="train"):
    """Flags generated from Config (help = the field's comment); explicit flag > --preset > Config default."""
    return data.parse_config(Config, PRESETS, check_config, argv, mode, f"{METHOD}.py", __doc__)


def cli(argv=None, mode="train"):
    """`python <method>.py [sample] [flags]`: a user's mistake (data.UserError) -> one line `error: ...`, exit 2."""
    return data.cli(main, argv, mode)


def save_checkpoint(path, obj):  # atomic; records this method and the world's version (data.save_checkpoint)
    data.save_checkpoint(path, METHOD, obj)


def load_checkpoint(path, device="cpu"):  # -> the saved dict; missing, unreadable or another method's -> UserError
    return data.load_checkpoint(path, METHOD, device)


# End of the shared setup.
# ----------------------------------------------------------------------------------------------------------------------
