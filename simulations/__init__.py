"""Many institutions on one machine: `fedrec train-central` (central.py) and `fedrec simulate`
(federated.py: the driver; superlink.py: Flower's processes; flower_app.py: the components)."""
