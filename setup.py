from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec((Path(__file__).parent / "nndiff" / "__init__.py").read_text(), version)

setup(
    name="nndiff",
    version=version["__version__"],
    description="Self-configuring diffusion models for medical imaging (the nnU-Net way)",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["nndiff", "nndiff.*"]),
    install_requires=[
        # CPU CI installs torch==2.13.0 first; this range must admit it so pip adds nothing.
        "torch>=2.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "SimpleITK>=2.2",
        "batchgenerators>=0.25",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "scikit-image>=0.21",  # denoising baselines (non-local means, total variation) in evaluation
        "h5py>=3.8",  # fastMRI-layout k-space files (.h5) for reconstruction prediction
    ],
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.1",
            "pytest-xdist>=3.3",
            "diffusers>=0.30",  # test oracle for the schedulers (tests/diffusion)
            "opensimplex>=0.4.5",  # test oracle for simplex noise
            "nilearn>=0.10",  # ships the MNI152 template the conversion tests use
        ],
        "demo": [
            "nilearn>=0.10",  # MNI152 T1 template (and GM/WM maps) inside the package, no download
        ],
    },
    entry_points={
        "console_scripts": [
            "nndiff_extract_fingerprint=nndiff.run.plan_and_preprocess:extract_fingerprint_entry",
            "nndiff_plan_experiment=nndiff.run.plan_and_preprocess:plan_experiment_entry",
            "nndiff_preprocess=nndiff.run.plan_and_preprocess:preprocess_entry",
            "nndiff_plan_and_preprocess=nndiff.run.plan_and_preprocess:plan_and_preprocess_entry",
            "nndiff_train=nndiff.run.train:train_entry",
            "nndiff_plan_and_train=nndiff.run.train:plan_and_train_entry",
            "nndiff_predict=nndiff.inference.cli:predict_entry",
            "nndiff_evaluate_folder=nndiff.run.evaluate:evaluate_folder_entry",
            "nndiff_evaluate_autoencoder=nndiff.run.evaluate_autoencoder:evaluate_autoencoder_entry",
            "nndiff_demo=nndiff.run.demo:main",
            "nndiff_convert_mni152=nndiff.dataset_conversion.mni152:main",
            "nndiff_convert_msd=nndiff.dataset_conversion.msd:main",
            "nndiff_convert_nnunet=nndiff.dataset_conversion.nnunet:main",
            "nndiff_convert_brats=nndiff.dataset_conversion.brats:main",
            "nndiff_convert_dicom=nndiff.dataset_conversion.dicom:main",
            "nndiff_convert_fastmri=nndiff.dataset_conversion.fastmri:main",
            "nndiff_convert_ixi=nndiff.dataset_conversion.ixi:main",
            "nndiff_convert_synthrad=nndiff.dataset_conversion.synthrad:main",
            "nndiff_convert_lowdose_ct=nndiff.dataset_conversion.lowdose_ct:main",
            "nndiff_convert_xray_csv=nndiff.dataset_conversion.xray_csv:main",
            "nndiff_export_model_to_zip=nndiff.run.model_sharing:export_entry",
            "nndiff_install_pretrained_model_from_zip=nndiff.run.model_sharing:install_entry",
            "nndiff_find_best_configuration=nndiff.run.find_best:find_best_entry",
            "nndiff_benchmark=nndiff.run.benchmark:main",
            "nndiff_export_submission=nndiff.run.submission:main",
        ],
    },
)
