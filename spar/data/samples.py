"""The bundled sample images (``spar/assets/samples``, with their licences), shipped in the
package: the demo, the page and the quick-start training run use them."""

from pathlib import Path

#: The folder of the bundled sample images.
SAMPLE_IMAGES = Path(__file__).resolve().parents[1] / "assets" / "samples"
