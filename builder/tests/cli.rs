//! `zw build` arguments and run(), as the binary calls them.

mod common;

use clap::Parser;
use common::*;

#[derive(Parser)]
struct Zw {
    #[command(flatten)]
    args: builder::cli::Args,
}

fn parse(argv: &[&str]) -> Result<builder::cli::Args, clap::Error> {
    Zw::try_parse_from(std::iter::once("zw-build").chain(argv.iter().copied())).map(|z| z.args)
}

#[test]
fn arguments_select_source_and_store() {
    let a = parse(&[
        "https://example.invalid/app.git",
        "--branch",
        "prod",
        "--build-arg",
        "A=1",
        "--build-arg",
        "B=2",
    ])
    .unwrap();
    assert_eq!(
        builder::cli::source_from_args(&a).unwrap(),
        builder::Source::Git {
            url: "https://example.invalid/app.git".into(),
            rev: builder::GitRev::Branch("prod".into())
        }
    );
    assert_eq!(a.build_args, vec!["A=1", "B=2"]);
    let a = parse(&[
        "github:acme/web",
        "--commit",
        "0123456789012345678901234567890123456789",
    ])
    .unwrap();
    let builder::Source::GitHub(gh) = builder::cli::source_from_args(&a).unwrap() else {
        panic!("github source expected")
    };
    assert_eq!(
        (gh.owner.as_str(), gh.repo.as_str(), gh.reference.as_str()),
        ("acme", "web", "0123456789012345678901234567890123456789")
    );
    assert!(
        parse(&["./app", "--store", "/tmp/s", "--s3-bucket", "b"]).is_err(),
        "--store conflicts with S3"
    );
    assert!(parse(&["./app", "--branch", "a", "--commit", "b"]).is_err());
    let a = parse(&["./app", "--branch", "main"]).unwrap();
    assert!(
        builder::cli::source_from_args(&a).is_err(),
        "--branch needs a git URL"
    );
}

#[tokio::test]
async fn zw_build_json_builds_into_the_store() {
    require_tools(&["buildah", "mkfs.ext4"]);
    let tmp = tempfile::tempdir().unwrap();
    let ctx = busybox_context(
        &tmp.path().join("src"),
        "FROM scratch\nARG WHO\nCOPY busybox /bin/busybox\nENV WHO=$WHO\nCMD [\"/bin/busybox\", \"true\"]\n",
    );
    let store = tmp.path().join("store");
    let data = tmp.path().join("data");
    let argv = [
        ctx.to_str().unwrap(),
        "--app",
        "web",
        "--data-dir",
        data.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--build-arg",
        "WHO=cli",
        "--json",
    ];
    builder::cli::run(parse(&argv).unwrap()).await.unwrap();
    let keys = builder::LocalStore::new(&store);
    let listed = builder::ObjectStore::list(&keys, "images/").await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let config: builder::ImageConfig =
        serde_json::from_slice(&std::fs::read(store.join(&listed[0])).unwrap()).unwrap();
    assert!(
        config.env.contains(&"WHO=cli".to_string()),
        "{:?}",
        config.env
    );

    // A missing Dockerfile is an error naming the cause.
    let argv = [
        data.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--dockerfile",
        "nope/Dockerfile",
    ];
    let err = builder::cli::run(parse(&argv).unwrap()).await.unwrap_err();
    assert!(format!("{err:#}").contains("no Dockerfile"), "{err:#}");
}
