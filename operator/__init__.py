"""LoRA Fleet operator: kopf controllers, adapter placement, migration and routing."""
