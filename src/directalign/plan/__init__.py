"""The resource planner behind ``directalign plan``: parameters, FLOPs per update, memory per GPU, a time bound and
whether a config fits a GPU, from the models' ``config.json`` files on the meta device (no weights).

:mod:`.sources` (config files, meta modules), :mod:`.probes` (one call of each part, as the adapters make it),
:mod:`.measure` (FLOP counting and live-memory tracking), :mod:`.work` (what a method's step runs),
:mod:`.gpus` (peak throughput table), :mod:`.estimate` (the plan), :mod:`.report` (table and JSON).
"""
