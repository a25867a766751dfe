"""Config files, one per method: `python -m adjax.main --config=configs/<method>.py[:<variant>]`."""
