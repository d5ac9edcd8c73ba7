"""Tools built on the library, never imported by it: speed measurements (``speed``), fault
trials (``fault_trials``), the interactive page (``app``; Gradio, the ``app`` extra) and the
teacher-versus-student demo (``demo``). The commands ``spar-speed`` and ``spar-app`` run them."""

#: The tools, as submodules: each is imported on its own (``import spar.tools.speed``), so that
#: ``import spar.tools`` loads none of their dependencies (Gradio for the page).
__all__ = ["app", "demo", "fault_trials", "speed"]
