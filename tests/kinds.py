"Small in-memory learners of every kind fastai builds, as a new user would make them (nothing downloaded, random weights)."
import warnings, numpy as np, pandas as pd, torch
from fastai.tabular.all import TabularDataLoaders, tabular_learner, Categorify, FillMissing, Normalize, CategoryBlock
from fastai.text.all import TextDataLoaders, text_classifier_learner, language_model_learner, AWD_LSTM, awd_lstm_clas_config, awd_lstm_lm_config
from fastai.vision.all import DataBlock, ImageBlock, MaskBlock, PILImage, PILMask, RandomSplitter, Resize, unet_learner, vision_learner, resnet18
from fastai.collab import CollabDataLoaders, collab_learner
from fastai.torch_core import set_seed
from cnn_cost.data import digit_images

# timm architectures, one or two per family, counted in tests/test_counting.py and stepped in bench/memory_corpus.py
TIMM = ['resnet50d', 'efficientnet_b0', 'mobilenetv3_small_100', 'mobilenetv4_conv_small', 'convnext_atto', 'convnextv2_atto', 'vit_tiny_patch16_224',
        'deit_tiny_patch16_224', 'swin_tiny_patch4_window7_224', 'swinv2_tiny_window8_256', 'beit_base_patch16_224', 'eva02_tiny_patch14_224',
        'levit_128s', 'maxvit_tiny_tf_224', 'coatnet_0_rw_224', 'convit_tiny', 'mixer_b16_224', 'poolformer_s12', 'efficientformer_l1', 'regnety_002',
        'xception41', 'ghostnet_100', 'cait_xxs24_224', 'crossvit_tiny_240', 'pvt_v2_b0', 'mobilevit_xxs', 'edgenext_xx_small', 'fastvit_t8',
        'repvit_m1', 'tiny_vit_5m_224', 'hiera_tiny_224', 'vit_small_patch16_rope_224']

# torchvision: the smallest model of each family runs in the default set; the other sizes of the same families with the slow set
TV_FAMILIES = ['alexnet', 'convnext_tiny', 'densenet121', 'efficientnet_b0', 'efficientnet_v2_s', 'googlenet', 'inception_v3', 'maxvit_t', 'mnasnet0_5',
               'mobilenet_v2', 'mobilenet_v3_small', 'regnet_x_400mf', 'regnet_y_400mf', 'resnet18', 'resnext50_32x4d', 'shufflenet_v2_x0_5',
               'squeezenet1_0', 'swin_t', 'swin_v2_t', 'vgg11_bn', 'vit_b_16', 'wide_resnet50_2']

SMALL_AWD = dict(emb_sz=32, n_hid=48, n_layers=2)  # AWD_LSTM's layout (embedding dropout, weight dropout, tied decoder), small

def tabular(bs=32):
    set_seed(0)
    n = 256
    df = pd.DataFrame({'a': np.random.choice(['x','y','z'], n), 'b': np.random.choice(['p','q'], n), 'c': np.random.randn(n), 'd': np.random.randn(n)})
    df['y'] = (df.c + (df.a=='x') > 0).astype(int)
    dls = TabularDataLoaders.from_df(df, cat_names=['a','b'], cont_names=['c','d'], y_names='y', procs=[Categorify, FillMissing, Normalize],
                                     bs=bs, y_block=CategoryBlock())
    return tabular_learner(dls, layers=[20,10])

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning light", "the market closed higher today",
         "rain fell all night long", "she read a book by the fire", "the team won the final game", "coffee tastes better in the morning"]*8

def text_classifier(bs=8):
    set_seed(0)
    df = pd.DataFrame({'text': TEXTS, 'label': [i%2 for i in range(len(TEXTS))]})
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', bs=bs, seq_len=16, num_workers=0)
    return text_classifier_learner(dls, AWD_LSTM, pretrained=False, config={**awd_lstm_clas_config, **SMALL_AWD}, seq_len=16)

def language_model(bs=8):
    set_seed(0)
    dls = TextDataLoaders.from_df(pd.DataFrame({'text': TEXTS}), text_col='text', is_lm=True, bs=bs, seq_len=16, num_workers=0)
    return language_model_learner(dls, AWD_LSTM, pretrained=False, config={**awd_lstm_lm_config, **SMALL_AWD})

def unet(bs=4, size=32):
    set_seed(0)
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 255, (size,size,3), dtype=np.uint8) for _ in range(16)]
    ms = [rng.integers(0, 3, (size,size), dtype=np.uint8) for _ in range(16)]
    dblock = DataBlock(blocks=(ImageBlock, MaskBlock(codes=['a','b','c'])), get_x=lambda i: PILImage.create(xs[i]),
                       get_y=lambda i: PILMask.create(ms[i]), splitter=RandomSplitter(seed=0))
    return unet_learner(dblock.dataloaders(range(16), bs=bs, num_workers=0), resnet18, pretrained=False, n_out=3)

def collab(use_nn=False, bs=64):
    set_seed(0)
    rng,n = np.random.default_rng(0),512
    df = pd.DataFrame({'user': rng.integers(0, 30, n), 'item': rng.integers(0, 20, n), 'rating': rng.random(n)*5})
    dls = CollabDataLoaders.from_df(df, bs=bs)
    return collab_learner(dls, n_factors=8, y_range=(0,5.5), use_nn=use_nn, layers=[16] if use_nn else None)

def timm_vision(arch, size, bs=4, n=32):
    "A fastai `vision_learner` on a timm architecture (by name), on the embedded digits at `size` x `size`"
    set_seed(0)
    ims,ys = digit_images()
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=[str(i) for i in range(10)])), get_x=lambda i: PILImage.create(ims[i]), get_y=lambda i: str(ys[i]),
                       splitter=RandomSplitter(seed=0), item_tfms=Resize(size))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return vision_learner(dblock.dataloaders(range(n), bs=bs, num_workers=0), arch, pretrained=False)
