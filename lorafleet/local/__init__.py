"""Local mode: `lorafleet up` / `down` and the kubelet shim that backs KWOK pods with real worker processes."""
