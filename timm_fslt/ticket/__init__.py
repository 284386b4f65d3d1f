"""Tickets: which network to rebuild, the file format and its seal, saving and loading, the Hub.

``architecture``: the record and its registries. ``format``: constants, bits, reading and
validating. ``integrity``: the seal and the layer digests. ``io``: ``save_ticket`` /
``load_ticket``. ``sources``: directories and Hub repo ids. ``hub``: the model card and
``push_to_hub``.
"""
from timm_fslt.ticket.architecture import create_model, register_builder, registered_builders
from timm_fslt.ticket.format import FORMAT_VERSION, read_config, read_ticket, size_report_from_config
from timm_fslt.ticket.integrity import seal_config
from timm_fslt.ticket.io import load_ticket, save_ticket
from timm_fslt.ticket.hub import push_to_hub

__all__ = ["FORMAT_VERSION", "create_model", "load_ticket", "push_to_hub", "read_config", "read_ticket",
           "register_builder", "registered_builders", "save_ticket", "seal_config", "size_report_from_config"]
