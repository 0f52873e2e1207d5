# Everything in cnn_cost, in fastai's manner: `from cnn_cost.all import *`. Hand-written (not exported by nbdev), like fastai's own `all.py` files.
from .core import *
from .counting import *
from .timing import *
from .summary import *
from .fake import *
from .memory import *
from .plan import *
from .data import *
from .learner import *
from .analysis import *
from .plots import *
from .callback import *
