"""Tools built on the library, never imported by it: speed measurements (``speed``), fault
trials (``fault_trials``), the interactive page (``app``; Gradio, the ``app`` extra) and the
teacher-versus-student demo (``demo``). The commands ``spar-speed`` and ``spar-app`` run them."""
