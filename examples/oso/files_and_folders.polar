# Files and folders: every role held on a folder is held on what it contains, to any depth.

actor User {}

resource Folder {
  roles = ["viewer", "editor", "owner"];
  permissions = ["read", "write", "share"];
  relations = { folder: Folder };

  role if role on "folder";

  "viewer" if "editor";
  "editor" if "owner";

  "read" if "viewer";
  "write" if "editor";
  "share" if "owner";
}

resource File {
  roles = ["viewer", "editor", "owner"];
  permissions = ["read", "write", "share"];
  relations = { folder: Folder };

  role if role on "folder";

  "viewer" if "editor";
  "editor" if "owner";

  "read" if "viewer";
  "write" if "editor";
  "share" if "owner";
}

test fixture tree {
  has_relation(Folder{"projects"}, "folder", Folder{"root"});
  has_relation(Folder{"secret"}, "folder", Folder{"projects"});
  has_relation(File{"plan.md"}, "folder", Folder{"secret"});
}

test "a role on a folder reaches every file below it" {
  setup {
    fixture tree;
    has_role(User{"ola"}, "editor", Folder{"root"});
    has_role(User{"pia"}, "viewer", Folder{"secret"});
  }
  assert allow(User{"ola"}, "write", File{"plan.md"});
  assert_not allow(User{"ola"}, "share", File{"plan.md"});
  assert allow(User{"pia"}, "read", File{"plan.md"});
  assert_not allow(User{"pia"}, "read", Folder{"projects"});
  assert allow(User{"pia"}, action: String, File{"plan.md"}) iff action in ["read"];
}

test "a role on a file does not climb to its folder" {
  setup {
    fixture tree;
    has_role(User{"ras"}, "owner", File{"plan.md"});
  }
  assert allow(User{"ras"}, "share", File{"plan.md"});
  assert_not allow(User{"ras"}, "read", Folder{"secret"});
}
