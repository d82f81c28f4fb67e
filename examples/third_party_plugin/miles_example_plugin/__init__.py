"""miles-example-plugin: how a third party ships a reward and a generate function for miles.

``rewards.exact_number`` (``--rm-type exact_number``), ``generate.single_turn_stats``
(``--custom-generate-function-path single_turn_stats``) and ``plugin`` (a flag and a metric); see README.md.
"""

__version__ = "0.1.0"
