"""`smartspec simulate`: the router's step loop on a virtual clock, against a world whose costs and
acceptance are not the controller's own model (world.py: the truth; load.py: what arrives; loop.py: the
step loop; oracle.py: the clairvoyant reference; sweep.py: cells and rows; report.py: the outputs)."""
