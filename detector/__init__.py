"""detector: reads weights and judges them (last stage of the flow: store → detector → report).

So far it hosts the ``weightbias`` command line (:mod:`detector.cli`), which sits downstream
of every other package and therefore may import all of them.
"""
