"""ContinualLearningJob: placeholder registration; the worker training API is driven by `cljob_sync` below."""
